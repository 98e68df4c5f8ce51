//! store — (being built)
