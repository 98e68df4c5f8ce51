//! spool — (being built)
