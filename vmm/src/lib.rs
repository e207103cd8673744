//! The veil VMM library.
