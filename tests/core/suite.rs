//! Integration tests of the core proxy against real PostgreSQL servers and real clients.
//! One topology (2 shards × 1 streaming replica) is shared by every trial and stopped at the end.

mod catalog;
mod clients;
mod harness;
mod ops;
mod pooling;
mod protocol;
mod rebalance;
mod replicas;
mod scatter_loss;
mod sharding;
mod tenants;

use harness::{Harness, TestResult};
use libtest_mimic::{Arguments, Trial};
use std::sync::{Arc, Mutex};

static HARNESS: Mutex<Option<Arc<Harness>>> = Mutex::new(None);

/// The shared topology.
pub fn h() -> Arc<Harness> {
    HARNESS.lock().unwrap().clone().expect("harness started")
}

/// A trial that runs `f` against the shared topology.
pub fn trial(name: &str, f: fn(&Harness) -> TestResult) -> Trial {
    Trial::test(name, move || f(&h()).map_err(Into::into))
}

fn main() {
    let args = Arguments::from_args();
    let mut trials = Vec::new();
    trials.extend(clients::trials());
    trials.extend(pooling::trials());
    trials.extend(protocol::trials());
    trials.extend(ops::trials());
    trials.extend(sharding::trials());
    trials.extend(tenants::trials());
    trials.extend(scatter_loss::trials());
    trials.extend(replicas::trials());
    trials.extend(catalog::trials());
    trials.extend(rebalance::trials());
    if args.list {
        libtest_mimic::run(&args, trials).exit();
    }
    *HARNESS.lock().unwrap() = Some(Arc::new(Harness::start()));
    let conclusion = libtest_mimic::run(&args, trials);
    // Every trial has finished: dropping the last handle kills the router and stops the servers.
    let harness = HARNESS.lock().unwrap().take();
    drop(harness);
    conclusion.exit();
}
