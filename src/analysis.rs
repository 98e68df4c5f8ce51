//! analysis — (being built)
