//! The demo's RPC phase: a parameter server ("ps", rank 0) owns the model
//! parameters. Each step it shares them as an RRef with every worker; a
//! worker fetches them, passes the RRef on to its neighbour (a fork from one
//! user to another), and returns a gradient that the server applies. At the
//! end every worker shuts down gracefully and no RRef is left anywhere.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use distcore::rpc::{CallArgs, Rpc, RpcFunction, RpcOptions};
use distcore::store::Store;
use distcore::{Error, Result};

const DIMENSIONS: usize = 4;
const STEPS: usize = 5;
const LEARNING_RATE: f64 = 0.5;

fn encode(values: &[f64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn decode(bytes: &[u8]) -> Vec<f64> {
    bytes
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().unwrap_or_default()))
        .collect()
}

fn options(timeout: Duration) -> RpcOptions {
    RpcOptions {
        rpc_timeout: timeout,
        ..RpcOptions::default()
    }
}

/// A worker: serves `train` and `peek` until the group shuts down.
pub fn serve(store: Arc<dyn Store>, rank: u16, world: u16, timeout: Duration) -> Result<()> {
    let me: Arc<OnceLock<Weak<Rpc>>> = Arc::new(OnceLock::new());
    let rpc_of = |slot: &Arc<OnceLock<Weak<Rpc>>>| {
        slot.get()
            .and_then(Weak::upgrade)
            .ok_or_else(|| Error::invalid_state("the worker is not running"))
    };
    let mut functions: HashMap<String, Arc<RpcFunction>> = HashMap::new();
    let slot = me.clone();
    functions.insert(
        "train".into(),
        Arc::new(move |call: &CallArgs<'_>| {
            let rpc = rpc_of(&slot)?;
            let params = decode(&rpc.to_here(&call.rrefs[0], None)?);
            // Share the parameters with the next worker: a user-to-user fork.
            let neighbour = format!("worker{}", rank % (world - 1) + 1);
            rpc.rpc_sync(&neighbour, "peek", b"", call.rrefs, None)?;
            let target = f64::from(rank);
            Ok(encode(
                &params.iter().map(|p| p - target).collect::<Vec<_>>(),
            ))
        }),
    );
    let slot = me.clone();
    functions.insert(
        "peek".into(),
        Arc::new(move |call: &CallArgs<'_>| {
            let rpc = rpc_of(&slot)?;
            Ok(rpc
                .to_here(&call.rrefs[0], None)?
                .len()
                .to_le_bytes()
                .to_vec())
        }),
    );
    let rpc = Rpc::init(
        store,
        &format!("worker{rank}"),
        rank,
        world,
        options(timeout),
        functions,
    )?;
    let _ = me.set(Arc::downgrade(&rpc));
    rpc.shutdown(true, Some(timeout))
}

/// The parameter server: runs the steps, then shuts the group down.
pub fn run(store: Arc<dyn Store>, workers: u16, timeout: Duration) -> Result<()> {
    let started = Instant::now();
    let rpc = Rpc::init(
        store,
        "ps",
        0,
        workers + 1,
        options(timeout),
        HashMap::new(),
    )?;
    let mut params = vec![0.0f64; DIMENSIONS];
    for step in 0..STEPS {
        let shared = rpc.rref(encode(&params));
        let calls = (1..=workers)
            .map(|w| {
                rpc.rpc_async(
                    &format!("worker{w}"),
                    "train",
                    b"",
                    std::slice::from_ref(&shared),
                    None,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let mut sum = vec![0.0; DIMENSIONS];
        for call in calls {
            call.wait(None)?;
            for (s, g) in sum.iter_mut().zip(decode(&call.result()?)) {
                *s += g;
            }
        }
        for (p, s) in params.iter_mut().zip(&sum) {
            *p -= LEARNING_RATE * s / f64::from(workers);
        }
        let info = rpc.debug_info();
        println!(
            "  rpc step {step}: parameters {:.3} (ps owns {} RRef(s) with {} fork(s) in flight)",
            params[0], info.num_owner_rrefs, info.num_forks
        );
    }
    rpc.shutdown(true, Some(timeout))?;
    let info = rpc.debug_info();
    let mean_rank = f64::from(workers + 1) / 2.0;
    println!(
        "  parameter server: {STEPS} steps converging to {mean_rank:.3} in {:.1} ms; after shutdown \
         owners={} forks={} pending users={} pending futures={}",
        started.elapsed().as_secs_f64() * 1e3,
        info.num_owner_rrefs,
        info.num_forks,
        info.num_pending_users,
        info.num_pending_futures
    );
    Ok(())
}
