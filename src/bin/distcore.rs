//! The `distcore` command line: a local demo of the coordination plane.

use std::process::ExitCode;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use distcore::store::{elastic, HashStore, PrefixStore, Store};
use distcore::{OpType, Work};

#[derive(Parser)]
#[command(
    name = "distcore",
    version,
    about = "The coordination plane of torch.distributed, without PyTorch"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Workers (threads) rendezvous through an embedded store with
    /// torchelastic's helpers, exchange data, and hand results back as Works.
    Demo {
        /// Number of workers.
        #[arg(long, default_value_t = 4)]
        workers: i64,
        /// Seconds any step may take before the demo fails.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Demo { workers, timeout } => demo(workers, Duration::from_secs(timeout)),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("distcore: {e} ({})", e.status());
            ExitCode::FAILURE
        }
    }
}

/// One worker: joins the barrier, publishes its shard, gathers everyone's,
/// and returns the global sum it computed (decimal text).
fn worker(
    store: Arc<dyn Store>,
    rank: i64,
    world: i64,
    timeout: Duration,
) -> distcore::Result<Vec<u8>> {
    let job: Arc<dyn Store> = Arc::new(PrefixStore::new("demo", store));
    elastic::barrier(&*job, world, "rendezvous", timeout)?;
    let shard: i64 = (1..=100).map(|i| i * (rank + 1)).sum();
    let all = elastic::synchronize(
        &*job,
        shard.to_string().as_bytes(),
        rank,
        world,
        "shards/",
        timeout,
    )?;
    let total: i64 = all
        .iter()
        .map(|v| String::from_utf8_lossy(v).parse::<i64>().unwrap_or(0))
        .sum();
    job.add("finished", 1)?;
    Ok(total.to_string().into_bytes())
}

fn demo(workers: i64, timeout: Duration) -> distcore::Result<()> {
    if workers < 1 {
        return Err(distcore::Error::invalid_argument(
            "--workers must be at least 1",
        ));
    }
    let started = Instant::now();
    let store: Arc<dyn Store> = Arc::new(HashStore::new());
    println!(
        "distcore {} demo: {workers} workers on an embedded HashStore",
        distcore::VERSION
    );
    let works: Vec<Work> = (0..workers)
        .map(|rank| {
            let work = Work::new(
                rank as i32,
                OpType::Allgather,
                Some("demo/worker"),
                Some(timeout),
            );
            let (finisher, store) = (work.clone(), store.clone_store()?);
            thread::spawn(move || {
                let _ = finisher.finish_with(worker(store, rank, workers, timeout));
            });
            Ok(work)
        })
        .collect::<distcore::Result<_>>()?;
    let expected: i64 = (1..=workers).map(|r| 5050 * r).sum();
    for work in &works {
        work.wait(None)?;
        let total = String::from_utf8_lossy(&work.result()?).into_owned();
        println!(
            "  rank {} (work #{}, {:.2} ms): global sum {total}",
            work.rank(),
            work.sequence_number(),
            work.duration()? * 1e3
        );
        if total != expected.to_string() {
            return Err(distcore::Error::internal(format!(
                "rank {} computed {total}, expected {expected}",
                work.rank()
            )));
        }
    }
    println!(
        "all {workers} workers agree on {expected}; the store holds {} keys; {:.1} ms in all",
        store.num_keys()?,
        started.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}
