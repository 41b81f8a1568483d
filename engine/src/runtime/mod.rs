//! Placeholder module list; filled below.
