pub mod attest;
pub mod error;
pub mod ledger;
pub mod model;
pub mod ratelimit;
pub mod registry;
pub mod request;
pub mod token;
