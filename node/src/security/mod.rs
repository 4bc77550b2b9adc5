//! Who a node and its callers are: TLS on the listeners, development
//! certificates, and bearer tokens.

pub mod certs;
pub mod tls;
pub mod token;
