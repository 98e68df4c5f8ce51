//! series — (being built)
