pub mod ledger;
pub mod model;
pub mod token;
pub mod request;
pub mod attest;
pub mod ratelimit;
pub mod registry;
