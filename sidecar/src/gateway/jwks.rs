//! JWKS key sets (in progress).
