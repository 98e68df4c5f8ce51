//! preprocess — (being built)
