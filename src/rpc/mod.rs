//! RPC and remote references: a small RPC agent whose workers find each
//! other through a store, and PyTorch's distributed reference counting of
//! RRefs over it.

pub mod agent;
pub mod context;
mod control;
mod frame;
mod handshake;
mod io_loop;
pub mod message;
mod pending;
mod pool;
pub mod rref;
mod writer;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;

use self::agent::{Agent, Guard, Replier, RequestHandler, WorkerInfo};
use self::context::{Context, DebugInfo};
use self::message::{ForkData, Request, Response, WorkerId};
use self::pool::Pool;
use self::rref::{RRef, UserRRef};
use crate::error::{Error, Result, Status};
use crate::printable::printable;
use crate::security::auth::Secret;
use crate::security::tls::{TlsClient, TlsServer};
use crate::store::{elastic, Store};
use crate::work::Work;

/// What a registered function receives.
pub struct CallArgs<'a> {
    /// The argument bytes.
    pub args: &'a [u8],
    /// The RRefs passed along, all confirmed by their owners.
    pub rrefs: &'a [RRef],
    /// The calling worker.
    pub caller: WorkerId,
}

/// A function other workers can call by name.
pub type RpcFunction = dyn Fn(&CallArgs<'_>) -> Result<Vec<u8>> + Send + Sync;

/// Options of [`Rpc::init`].
#[derive(Debug, Clone)]
pub struct RpcOptions {
    /// Threads running user functions and RRef handlers.
    pub num_worker_threads: usize,
    /// Default timeout of calls, remote(), to_here and control messages.
    pub rpc_timeout: Duration,
    /// The address this worker listens on and advertises.
    pub listen_address: IpAddr,
    /// At shutdown, report leaked RRefs as a warning (true) or an error.
    pub ignore_rref_leak: bool,
    /// The group's shared secret: every connection between workers
    /// authenticates with it (challenge-response; it never travels)
    /// before any message. Every worker of the group needs the same.
    pub secret: Option<Secret>,
    /// Serve other workers' connections over TLS with this certificate
    /// (with a client CA, theirs are verified too). Every worker of the
    /// group needs TLS if one has it.
    pub tls_server: Option<TlsServer>,
    /// Connect to other workers over TLS, trusting these CAs (their
    /// certificates must be valid for the address they listen on, or for
    /// the client's server name).
    pub tls_client: Option<TlsClient>,
}

impl Default for RpcOptions {
    fn default() -> Self {
        RpcOptions {
            num_worker_threads: 4,
            rpc_timeout: Duration::from_secs(60),
            listen_address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            ignore_rref_leak: true,
            secret: None,
            tls_server: None,
            tls_client: None,
        }
    }
}

/// One worker of an RPC group.
pub struct Rpc {
    me: WorkerInfo,
    world_size: u16,
    store: Arc<dyn Store>,
    agent: Arc<Agent>,
    ctx: Arc<Context>,
    core: Arc<Core>,
    options: RpcOptions,
    /// A shutdown has begun (calls still work during a graceful one).
    shutting_down: AtomicBool,
    /// The agent has stopped: calls fail with [`Status::ShutDown`].
    stopped: AtomicBool,
}

/// What request handling needs, shared with the agent's handler.
struct Core {
    ctx: Arc<Context>,
    agent: Arc<Agent>,
    pool: Pool,
    functions: RwLock<HashMap<String, Arc<RpcFunction>>>,
}

const WORKERS_PREFIX: &str = "rpc/workers/";

impl Rpc {
    /// Joins the RPC group: listens on an ephemeral port, registers
    /// `functions`, publishes `name` and the address through `store`
    /// (torchelastic's synchronize, keys `rpc/workers/<rank>`), and learns
    /// every other worker. Functions registered here are callable as soon as
    /// any worker's init returns.
    pub fn init(
        store: Arc<dyn Store>,
        name: &str,
        rank: u16,
        world_size: u16,
        options: RpcOptions,
        functions: HashMap<String, Arc<RpcFunction>>,
    ) -> Result<Arc<Rpc>> {
        if name.is_empty() || name.contains('\n') {
            return Err(Error::invalid_argument(
                "a worker name must be non-empty and on one line",
            ));
        }
        if rank >= world_size {
            return Err(Error::invalid_argument(format!(
                "rank {rank} is not below world size {world_size}"
            )));
        }
        let listener = std::net::TcpListener::bind(SocketAddr::new(options.listen_address, 0))
            .map_err(|e| {
                Error::network(format!("RPC listener on {}: {e}", options.listen_address))
            })?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::network(format!("RPC listener: {e}")))?;
        let guard = Guard {
            secret: options.secret.clone(),
            tls_server: options.tls_server.clone(),
            tls_client: options.tls_client.clone(),
            ..Guard::default()
        };
        if guard.tls_server.is_some() != guard.tls_client.is_some() {
            return Err(Error::invalid_argument(
                "RPC workers speak TLS both ways or not at all: give a worker its certificate \
                 and key and the CA file, or neither",
            ));
        }
        let agent = Arc::new(Agent::start(rank, listener, guard)?);
        let ctx = Context::new(rank, options.rpc_timeout);
        control::attach(&ctx, &agent);
        let pool = Pool::new(&format!("dc-rpc-{rank}"), options.num_worker_threads)
            .map_err(|e| Error::internal(format!("starting RPC threads: {e}")))?;
        let core = Arc::new(Core {
            ctx: ctx.clone(),
            agent: agent.clone(),
            pool,
            functions: RwLock::new(functions),
        });
        agent.set_handler(Arc::new(Dispatcher {
            core: Arc::downgrade(&core),
        }));
        let published = format!("{name}\n{addr}");
        let all = elastic::synchronize(
            &*store,
            published.as_bytes(),
            i64::from(rank),
            i64::from(world_size),
            WORKERS_PREFIX,
            options.rpc_timeout,
        )?;
        let workers = parse_workers(&all)?;
        log::info!(
            "RPC worker '{}' (rank {rank}) joined a group of {world_size} on {addr}",
            printable(name.as_bytes())
        );
        agent.set_peers(workers.clone());
        Ok(Arc::new(Rpc {
            me: workers[usize::from(rank)].clone(),
            world_size,
            store,
            agent,
            ctx,
            core,
            options,
            shutting_down: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
        }))
    }

    /// This worker.
    pub fn worker_info(&self) -> &WorkerInfo {
        &self.me
    }

    /// Every worker of the group, by id.
    pub fn workers(&self) -> Vec<WorkerInfo> {
        self.agent.workers()
    }

    /// The worker named `name`.
    pub fn worker(&self, name: &str) -> Result<WorkerInfo> {
        self.agent
            .worker_by_name(name)
            .ok_or_else(|| Error::invalid_argument(format!("Unknown destination worker {name}")))
    }

    /// The number of workers.
    pub fn world_size(&self) -> u16 {
        self.world_size
    }

    /// The RRef counters of this worker.
    pub fn debug_info(&self) -> DebugInfo {
        self.ctx.debug_info()
    }

    /// Makes `function` callable by other workers as `name`.
    pub fn register(&self, name: &str, function: Arc<RpcFunction>) {
        self.core
            .functions
            .write()
            .insert(name.to_owned(), function);
    }

    fn check_running(&self) -> Result<()> {
        if self.stopped.load(Ordering::SeqCst) {
            return Err(Error::new(
                Status::ShutDown,
                "RPC has already been shut down",
            ));
        }
        Ok(())
    }

    fn timeout(&self, timeout: Option<Duration>) -> Duration {
        timeout.unwrap_or(self.options.rpc_timeout)
    }

    fn forks(&self, rrefs: &[RRef]) -> Result<Vec<ForkData>> {
        rrefs
            .iter()
            .map(|r| self.ctx.prepare_child_fork(r))
            .collect()
    }

    /// Calls `func` on worker `to`; the work's result is the reply. Once
    /// `to` is lost (its connection failed: it died), the work fails at
    /// once with [`Status::PeerFailed`] naming it, as do later calls to
    /// it and `to_here` on its RRefs (docs/liveness.md, "RPC").
    pub fn rpc_async(
        &self,
        to: &str,
        func: &str,
        args: &[u8],
        rrefs: &[RRef],
        timeout: Option<Duration>,
    ) -> Result<Work> {
        self.check_running()?;
        let dst = self.worker(to)?;
        let request = Request::Call {
            func: func.into(),
            args: args.to_vec(),
            rrefs: self.forks(rrefs)?,
        };
        Ok(self.agent.send(dst.id, &request, self.timeout(timeout)))
    }

    /// Calls `func` on worker `to` and waits for the reply.
    pub fn rpc_sync(
        &self,
        to: &str,
        func: &str,
        args: &[u8],
        rrefs: &[RRef],
        timeout: Option<Duration>,
    ) -> Result<Vec<u8>> {
        reply_of(&self.rpc_async(to, func, args, rrefs, timeout)?)
    }

    /// Runs `func` on worker `to`, keeping the result there, and returns an
    /// RRef to it: a UserRRef confirmed once the owner answers, or the
    /// OwnerRRef itself when `to` is this worker.
    pub fn remote(
        &self,
        to: &str,
        func: &str,
        args: &[u8],
        rrefs: &[RRef],
        timeout: Option<Duration>,
    ) -> Result<RRef> {
        self.check_running()?;
        let dst = self.worker(to)?;
        if dst.id == self.me.id {
            // Nothing remote knows this RRef yet: like `rpc.RRef(v)`, it is
            // registered as an owner only when it is forked, so it goes when
            // its last local handle does.
            let owner = self.ctx.create_owner_rref();
            let owned: Vec<RRef> = rrefs.to_vec();
            let core = self.core.clone();
            let me = self.me.id;
            let func = func.to_owned();
            let args = args.to_vec();
            let target = owner.clone();
            self.core
                .pool
                .execute(move || target.set(core.run(&func, &args, &owned, me)));
            return Ok(RRef::Owner(owner));
        }
        let rref_id = self.ctx.gen_globally_unique_id();
        let fork_id = self.ctx.gen_globally_unique_id();
        let user: Arc<UserRRef> = self.ctx.create_user_rref(dst.id, rref_id, fork_id);
        self.ctx.add_pending_user(fork_id, user.clone());
        let request = Request::Remote {
            func: func.into(),
            args: args.to_vec(),
            rrefs: self.forks(rrefs)?,
            rref_id,
            fork_id,
        };
        let sent = self.agent.send(dst.id, &request, self.timeout(timeout));
        let ctx = Arc::downgrade(&self.ctx);
        sent.add_done_callback(Box::new(move |done| {
            if let Some(ctx) = ctx.upgrade() {
                let outcome = done.wait(Some(Duration::ZERO)).and_then(|()| {
                    let reply = done.result()?;
                    Ok(match reply.split_first() {
                        Some((1, message)) => {
                            Some(Error::new(Status::Remote, String::from_utf8_lossy(message)))
                        }
                        _ => None,
                    })
                });
                ctx.finish_remote(fork_id, outcome);
            }
        }));
        Ok(RRef::User(user))
    }

    /// Creates an RRef owned by this worker holding `value` (`rpc.RRef(v)`).
    pub fn rref(&self, value: Vec<u8>) -> RRef {
        let owner = self.ctx.create_owner_rref();
        owner.set(Ok(value));
        RRef::Owner(owner)
    }

    /// The value of `rref`, fetched from its owner (local on the owner).
    pub fn to_here(&self, rref: &RRef, timeout: Option<Duration>) -> Result<Vec<u8>> {
        match rref {
            RRef::Owner(_) => rref.local_value(),
            RRef::User(user) => {
                if let Some(error) = user.error() {
                    return Err(error);
                }
                self.check_running()?;
                let fetch = Request::Fetch {
                    rref_id: user.rref_id(),
                };
                reply_of(&self.agent.send(user.owner(), &fetch, self.timeout(timeout)))
            }
        }
    }

    /// The name of `rref`'s owner.
    pub fn owner_name(&self, rref: &RRef) -> String {
        let owner = match rref {
            RRef::Owner(_) => self.me.id,
            RRef::User(u) => u.owner(),
        };
        self.agent
            .worker(owner)
            .map_or_else(|| owner.to_string(), |w| w.name)
    }

    /// The id of `rref`'s owner.
    pub fn owner_id(&self, rref: &RRef) -> WorkerId {
        match rref {
            RRef::Owner(_) => self.me.id,
            RRef::User(u) => u.owner(),
        }
    }

    /// Shuts down. Graceful: barrier every worker through the store, settle
    /// and delete every RRef (PyTorch's `_delete_all_user_and_unforked_owner_rrefs`),
    /// barrier again, stop, then report leaks (an error when leaks are not
    /// ignored). Not graceful: stop now; pending calls fail.
    pub fn shutdown(&self, graceful: bool, timeout: Option<Duration>) -> Result<()> {
        if self.shutting_down.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let timeout = self.timeout(timeout);
        let outcome = if graceful {
            self.settle(timeout)
        } else {
            Ok(())
        };
        self.stopped.store(true, Ordering::SeqCst);
        self.agent.shutdown();
        log::info!(
            "RPC worker '{}' (rank {}) left its group",
            printable(self.me.name.as_bytes()),
            self.me.id
        );
        outcome?;
        if graceful {
            self.ctx.check_rref_leaks(self.options.ignore_rref_leak)?;
        }
        Ok(())
    }

    fn settle(&self, timeout: Duration) -> Result<()> {
        let world = i64::from(self.world_size);
        elastic::barrier(&*self.store, world, "rpc/shutdown/start", timeout)?;
        self.ctx.del_all_users_and_unforked_owners(timeout);
        if !self.ctx.wait_for_pending_futures(timeout) {
            log::error!("Timed out waiting for RRef control messages to be acknowledged.");
        }
        self.agent.leave();
        elastic::barrier(&*self.store, world, "rpc/shutdown/end", timeout)
    }
}

impl Drop for Rpc {
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.agent.shutdown();
    }
}

/// Waits for a reply and returns its bytes.
fn reply_of(work: &Work) -> Result<Vec<u8>> {
    work.wait(Some(Duration::ZERO))?;
    Ok(work.result().map(|r| r.to_vec()).unwrap_or_default())
}

fn parse_workers(all: &[Vec<u8>]) -> Result<Vec<WorkerInfo>> {
    let mut workers = Vec::with_capacity(all.len());
    for (rank, entry) in all.iter().enumerate() {
        let text = String::from_utf8_lossy(entry);
        let (name, addr) = text.split_once('\n').ok_or_else(|| {
            Error::new(
                Status::Protocol,
                format!("bad worker record for rank {rank}"),
            )
        })?;
        let addr: SocketAddr = addr.parse().map_err(|_| {
            Error::new(
                Status::Protocol,
                format!("bad address '{addr}' for rank {rank}"),
            )
        })?;
        if workers.iter().any(|w: &WorkerInfo| w.name == name) {
            return Err(Error::invalid_argument(format!(
                "worker name '{name}' is used twice"
            )));
        }
        workers.push(WorkerInfo {
            id: rank as WorkerId,
            name: name.to_owned(),
            addr,
        });
    }
    Ok(workers)
}

impl Core {
    /// Runs the registered function `func`.
    fn run(&self, func: &str, args: &[u8], rrefs: &[RRef], caller: WorkerId) -> Result<Vec<u8>> {
        let function = self.functions.read().get(func).cloned();
        let function = function.ok_or_else(|| {
            let me = self
                .agent
                .worker(self.agent.id())
                .map_or_else(String::new, |w| w.name);
            Error::new(
                Status::Remote,
                format!("Unknown function '{func}' on worker '{me}'"),
            )
        })?;
        function(&CallArgs {
            args,
            rrefs,
            caller,
        })
    }

    /// Turns received forks into RRefs and tells owners and parents.
    fn receive_rrefs(&self, forks: &[ForkData]) -> Vec<RRef> {
        forks
            .iter()
            .map(|f| {
                let rref = self.ctx.get_or_create_rref(f);
                self.ctx
                    .notify_owner_and_parent_of_fork(f.fork_id, f.parent, &rref);
                rref
            })
            .collect()
    }

    /// Runs `func` once every RRef argument is confirmed, then `reply`.
    /// Called on a pool thread: with nothing to wait for, the function runs
    /// right here rather than as another job (a thread hand-off per call).
    fn call_when_confirmed(
        self: &Arc<Self>,
        func: String,
        args: Vec<u8>,
        forks: Vec<ForkData>,
        caller: WorkerId,
        reply: impl FnOnce(Result<Vec<u8>>) + Send + 'static,
    ) {
        let rrefs = self.receive_rrefs(&forks);
        let ready = self.ctx.wait_for_pending_users(&rrefs);
        if ready.is_completed() {
            let outcome = ready.wait(Some(Duration::ZERO));
            reply(outcome.and_then(|()| self.run(&func, &args, &rrefs, caller)));
            return;
        }
        let core = self.clone();
        ready.add_done_callback(Box::new(move |done| {
            if let Err(e) = done.wait(Some(Duration::ZERO)) {
                reply(Err(e));
                return;
            }
            let runner = core.clone();
            core.pool
                .execute(move || reply(runner.run(&func, &args, &rrefs, caller)));
        }));
    }
}

fn respond(replier: Replier, outcome: Result<Vec<u8>>) {
    replier.send(match outcome {
        Ok(bytes) => Response::Ok(bytes),
        Err(e) => Response::Err(e.message().to_string()),
    });
}

/// The reply of a remote(): the RRef exists; byte 0 with the function's
/// success, 1 + message when the function failed (the owner keeps the error).
fn remote_reply(outcome: &Result<Vec<u8>>) -> Vec<u8> {
    match outcome {
        Ok(_) => vec![0],
        Err(e) => [&[1u8][..], e.message().as_bytes()].concat(),
    }
}

/// The agent's view of the core; weak, so the agent does not keep it alive.
struct Dispatcher {
    core: std::sync::Weak<Core>,
}

impl RequestHandler for Dispatcher {
    fn handle(&self, from: WorkerId, request: Request, replier: Replier) {
        let Some(core) = self.core.upgrade() else {
            return;
        };
        match request {
            Request::Call { func, args, rrefs } => {
                let inner = core.clone();
                core.pool.execute(move || {
                    inner.call_when_confirmed(func, args, rrefs, from, move |outcome| {
                        respond(replier, outcome)
                    })
                });
            }
            Request::Remote {
                func,
                args,
                rrefs,
                rref_id,
                fork_id,
            } => {
                let inner = core.clone();
                core.pool.execute(move || {
                    let owner = inner.ctx.get_or_create_owner_rref(rref_id);
                    if rref_id != fork_id {
                        inner.ctx.add_fork_of_owner_if_not_present(rref_id, fork_id);
                    }
                    inner.call_when_confirmed(func, args, rrefs, from, move |outcome| {
                        // The reply goes out before the value is set, so
                        // it precedes any fetch reply waiting on the value
                        // (same connection): a user that has the value has
                        // its confirmation.
                        respond(replier, Ok(remote_reply(&outcome)));
                        owner.set(outcome);
                    });
                });
            }
            Request::Fetch { rref_id } => core.ctx.get_owner_rref(rref_id, move |owner| {
                let value = owner.value().clone();
                value.add_done_callback(Box::new(move |done| {
                    respond(
                        replier,
                        done.wait(Some(Duration::ZERO))
                            .and_then(|()| Ok(done.result()?.to_vec())),
                    );
                }));
            }),
            control @ (Request::UserDelete { .. }
            | Request::ForkRequest { .. }
            | Request::ChildAccept { .. }) => {
                core.ctx.handle_control(&control);
                respond(replier, Ok(Vec::new()));
            }
        }
    }

    fn worker_lost(&self, worker: WorkerId, error: &Error) {
        if let Some(core) = self.core.upgrade() {
            core.ctx.worker_lost(worker, error);
        }
    }
}

#[cfg(test)]
mod tests;
