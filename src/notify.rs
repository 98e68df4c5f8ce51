//! notify — (being built)
