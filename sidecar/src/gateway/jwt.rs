//! JWT authentication (in progress).
