//! shardctl: operate a pgshard deployment through its admin console.

use anyhow::Context;
mod bars;
mod verify;

use clap::{Parser, Subcommand};
use pgshard::catalog::Catalog;
use pgshard::shardmap::config::MovePhase;
use pgshard::shardmap::{ShardMap, Strategy};
use tokio_postgres::{NoTls, SimpleQueryMessage};

#[derive(Parser)]
#[command(
    name = "shardctl",
    version,
    about = "Operate pgshard through its admin console"
)]
struct Cli {
    /// Router host.
    #[arg(long, default_value = "127.0.0.1", env = "PGSHARD_HOST")]
    host: String,
    /// Router port.
    #[arg(long, default_value_t = 6432, env = "PGSHARD_PORT")]
    port: u16,
    /// Admin user (one of general.admin_users).
    #[arg(long, default_value = "admin", env = "PGSHARD_USER")]
    user: String,
    /// Admin password.
    #[arg(long, env = "PGSHARD_PASSWORD", default_value = "")]
    password: String,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
    /// Catalog connection string (the `[catalog] dsn` of the routers), for the shared map.
    #[arg(long, env = "PGSHARD_CATALOG")]
    catalog: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Shards with their health, pools with their load and, with --catalog, the shared map:
    /// its version, the routers following it, and the units each shard holds.
    Status,
    /// The catalog's current shard map, as the TOML of a `[sharding]` section.
    Map,
    /// Re-read the router's config file.
    Reload,
    /// Move a unit (a tenant, hash buckets, a key range, a region or a share of one) of a distribution to another shard while
    /// routers keep serving it: copy, catch up, fence, switch, verify, clean up.
    /// Exit status: 0 done, 2 refused or aborted (no trace left), 3 switched but verification
    /// failed, 4 stopped by a test hook.
    Move(MoveArgs),
    /// Undo a move. Before its switch (e.g. shardctl was killed): routers forget it, its slots
    /// and publications are dropped, the target's partial copy is deleted. After its switch
    /// (held, stopped, or failed verification): the unit moves back to its source online, with
    /// the writes the target took since (replayed from a reverse slot), then leaves the target.
    Abort {
        /// The move's id (shardctl status lists moves in flight).
        id: u64,
        #[command(flatten)]
        shards: ShardArgs,
    },
    /// Finish a move that stopped. After its switch: drop replication, delete the unit from
    /// the source, remove the move from the map. Before it: copy again (the old slot dropped,
    /// the partial copy deleted) and go on to the switch. An undo that stopped goes on.
    Resume {
        id: u64,
        #[command(flatten)]
        shards: ShardArgs,
    },
    /// Check that every row of a distribution's tables (all distributions without
    /// --distribution) is on the shard the catalog's map puts it on. Exit status: 0 all placed,
    /// 3 rows misplaced, 2 a distribution could not be checked (a move in flight).
    Verify {
        #[arg(long)]
        distribution: Option<String>,
        #[command(flatten)]
        shards: ShardArgs,
    },
    /// Moves of bucket ranges that even out rows across shards, from rows counted per bucket
    /// on every shard (a dry run: nothing moves).
    Plan(PlanArgs),
    /// Plan, then with --apply run the moves one at a time (without it: the same as plan).
    Rebalance {
        #[command(flatten)]
        plan: PlanArgs,
        /// Run the moves.
        #[arg(long)]
        apply: bool,
    },
    /// Put the next shard of the config into the catalog's map: schema and reference tables
    /// copied, then it serves (empty of sharded rows until `rebalance --apply` fills it).
    /// Every live router's config must list it. Exit status: 0 added, 2 refused.
    AddShard {
        #[command(flatten)]
        shards: ShardArgs,
    },
    /// Move every bucket of a shard onto the others (rebalance --drain SHARD).
    DrainShard {
        /// The shard to empty.
        shard: usize,
        #[command(flatten)]
        plan: PlanArgs,
        #[arg(long)]
        apply: bool,
    },
}

#[derive(clap::Args)]
struct PlanArgs {
    /// The hash or tenant distribution to balance.
    #[arg(long)]
    distribution: String,
    /// Empty this shard instead of evening out.
    #[arg(long)]
    drain: Option<usize>,
    /// Shards within this fraction above the mean count as balanced.
    #[arg(long, default_value_t = 0.1)]
    tolerance: f64,
    /// At most this many moves.
    #[arg(long, default_value_t = 16)]
    max_moves: usize,
    #[command(flatten)]
    shards: ShardArgs,
}

impl ShardArgs {
    fn copy_streams(&self) -> pgshard::rebalance::copy::CopyStreams {
        pgshard::rebalance::copy::CopyStreams {
            max: self.copy_streams,
            min_pages: self.copy_stream_pages,
        }
    }

    fn stop_after(&self) -> anyhow::Result<Option<MovePhase>> {
        Ok(match self.unsafe_stop_after.as_deref() {
            None => None,
            Some("copying") => Some(MovePhase::Copying),
            Some("fenced") => Some(MovePhase::Fenced),
            Some("switched") => Some(MovePhase::Switched),
            Some(other) => anyhow::bail!("unknown phase {other}"),
        })
    }

    fn controls(&self) -> anyhow::Result<pgshard::rebalance::Controls> {
        Ok(pgshard::rebalance::Controls {
            ack_timeout: self.ack_timeout.into(),
            copy: self.copy_streams(),
            stop_after: self.stop_after()?,
        })
    }
}

/// Where the shards are and how to log in to them.
#[derive(clap::Args)]
struct ShardArgs {
    /// The routers' config file: shard addresses and server credentials.
    #[arg(long, env = "PGSHARD_CONFIG")]
    config: std::path::PathBuf,
    /// Sharded database to move rows in (default: the first sharded database of the config).
    #[arg(long)]
    database: Option<String>,
    /// Server user to connect as (needs REPLICATION and ownership of the tables; default: the
    /// config's first user).
    #[arg(long)]
    server_user: Option<String>,
    /// How long routers may take to acknowledge each map version.
    #[arg(long, default_value = "30s")]
    ack_timeout: humantime::Duration,
    /// Test-only: stop as if killed once this phase is published (copying, fenced, switched).
    #[arg(long, hide = true)]
    unsafe_stop_after: Option<String>,
    /// Parallel COPY streams per table when a move copies rows.
    #[arg(long, default_value_t = 2)]
    copy_streams: usize,
    /// Heap pages (8 kB) each copy stream gets at least: smaller tables use fewer streams.
    #[arg(long, default_value_t = 1024)]
    copy_stream_pages: u64,
}

#[derive(clap::Args)]
struct MoveArgs {
    /// The distribution the unit belongs to.
    #[arg(long)]
    distribution: String,
    /// Move this tenant (tenant distributions).
    #[arg(long, group = "unit")]
    tenant: Option<String>,
    /// Move this region (geo distributions; not the default region). A region whose group
    /// spans shards moves one member's share at a time: name it with --from.
    #[arg(long, group = "unit")]
    region: Option<String>,
    /// With --region: the shard of the region's group whose share moves (its members on that
    /// shard become --to).
    #[arg(long, requires = "region")]
    from: Option<usize>,
    /// Move these buckets, e.g. `0-255,1024` (hash and tenant distributions).
    #[arg(long, group = "unit")]
    buckets: Option<String>,
    /// Move the keys `LO..HI` (`LO <= key < HI`; `..HI` or `LO..` leave a side unbounded)
    /// of a range distribution; they must lie within one of its ranges.
    #[arg(long, group = "unit")]
    range: Option<String>,
    /// Target shard.
    #[arg(long)]
    to: usize,
    #[command(flatten)]
    shards: ShardArgs,
    /// Stop once the switch is verified, keeping the source's rows and a reverse slot on the
    /// target: `shardctl resume ID` completes the move, `shardctl abort ID` moves the unit back.
    #[arg(long)]
    hold: bool,
    /// Test-only negative control: switch without waiting for the fence marker.
    #[arg(long, hide = true)]
    unsafe_skip_marker_wait: bool,
    /// Test-only: wait this long after the copy (the test fails the source meanwhile).
    #[arg(long, hide = true)]
    unsafe_pause_after_copy: Option<humantime::Duration>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let abort = matches!(cli.command, Command::Abort { .. });
    match cli.command {
        Command::Status => {
            let client = console(&cli).await?;
            for (title, sql) in [
                ("shards", "SHOW SHARDS"),
                ("pools", "SHOW POOLS"),
                ("move slots", "SHOW SLOTS"),
            ] {
                let (cols, rows) = table(&client.simple_query(sql).await?);
                print_rows(title, &cols, &rows, cli.json);
            }
            if let Some(dsn) = &cli.catalog {
                catalog_status(dsn, cli.json).await?;
            }
        }
        Command::Reload => {
            console(&cli).await?.simple_query("RELOAD").await?;
            println!("reloaded");
        }
        Command::Move(args) => {
            let dsn = catalog_dsn(&cli.catalog, "move")?;
            std::process::exit(run_move(dsn, &args, cli.json).await?);
        }
        Command::Plan(args) => {
            let dsn = catalog_dsn(&cli.catalog, "plan")?;
            std::process::exit(rebalance_cmd(dsn, &args, args.drain, false, cli.json).await?);
        }
        Command::Rebalance { plan, apply } => {
            let dsn = catalog_dsn(&cli.catalog, "rebalance")?;
            std::process::exit(rebalance_cmd(dsn, &plan, plan.drain, apply, cli.json).await?);
        }
        Command::DrainShard { shard, plan, apply } => {
            let dsn = catalog_dsn(&cli.catalog, "drain-shard")?;
            std::process::exit(rebalance_cmd(dsn, &plan, Some(shard), apply, cli.json).await?);
        }
        Command::Abort { id, shards } | Command::Resume { id, shards } => {
            let dsn = catalog_dsn(&cli.catalog, "abort/resume")?;
            let links = shard_links(&shards).await?;
            let (cat, _) = Catalog::connect(dsn)
                .await
                .context("connecting to the catalog")?;
            let progress = bars::Bars::new("", false);
            let r = if abort {
                pgshard::rebalance::abort(&cat, &links, id, &shards.controls()?, &progress)
                    .await
                    .map(|_| ())
            } else {
                pgshard::rebalance::resume(&cat, &links, id, &shards.controls()?, &progress)
                    .await
                    .map(|_| ())
            };
            if let Err(e) = r {
                eprintln!("shardctl: {e}");
                std::process::exit(2);
            }
        }
        Command::Verify {
            distribution,
            shards,
        } => {
            let dsn = catalog_dsn(&cli.catalog, "verify")?;
            std::process::exit(verify::run(dsn, distribution.as_deref(), &shards, cli.json).await?);
        }
        Command::AddShard { shards } => {
            let dsn = catalog_dsn(&cli.catalog, "add-shard")?;
            let links = shard_links(&shards).await?;
            let (cat, _) = Catalog::connect(dsn)
                .await
                .context("connecting to the catalog")?;
            let progress = bars::Bars::new("", cli.json);
            match pgshard::rebalance::add::add_shard(
                &cat,
                &links,
                shards.ack_timeout.into(),
                &progress,
            )
            .await
            {
                Ok(r) => {
                    let cols = [
                        "shard",
                        "version",
                        "schema_copied",
                        "reference_tables",
                        "reference_rows",
                    ]
                    .map(String::from);
                    let row = vec![
                        r.shard.to_string(),
                        r.version.to_string(),
                        r.schema_copied.to_string(),
                        r.reference_tables.to_string(),
                        r.reference_rows.to_string(),
                    ];
                    print_rows("added", &cols, &[row], cli.json);
                }
                Err(e) => {
                    eprintln!("shardctl: {e}");
                    std::process::exit(2);
                }
            }
        }
        Command::Map => {
            let dsn = catalog_dsn(&cli.catalog, "map")?;
            let (cat, _) = Catalog::connect(dsn)
                .await
                .context("connecting to the catalog")?;
            let map = cat.latest_map().await?.context(
                "the catalog holds no map yet: start a router with [catalog] to seed it",
            )?;
            println!(
                "# map version {} over {} shards: {}",
                map.version, map.shards, map.note
            );
            print!("{}", toml::to_string(&map.sharding)?);
        }
    }
    Ok(())
}

/// Runs a move; returns the exit status.
/// The catalog DSN every map-changing command needs.
fn catalog_dsn<'a>(catalog: &'a Option<String>, verb: &str) -> anyhow::Result<&'a str> {
    catalog
        .as_deref()
        .with_context(|| format!("shardctl {verb} needs --catalog (or PGSHARD_CATALOG)"))
}

async fn run_move(dsn: &str, args: &MoveArgs, json: bool) -> anyhow::Result<i32> {
    use pgshard::rebalance::{self, MoveError, MoveRequest, UnitSpec};
    let shards = shard_links(&args.shards).await?;
    // A region is one key value of its distribution, as a tenant is.
    let unit = match (
        args.tenant.as_ref().or(args.region.as_ref()),
        &args.buckets,
        &args.range,
    ) {
        (Some(r), _, _) if args.from.is_some() => UnitSpec::RegionShare {
            region: r.clone(),
            from: args.from.unwrap_or_default(),
        },
        (Some(t), _, _) => UnitSpec::Tenant(t.clone()),
        (None, Some(b), _) => UnitSpec::Buckets(parse_buckets(b)?),
        (None, None, Some(r)) => UnitSpec::Range(parse_range(r)?),
        (None, None, None) => anyhow::bail!("name a --tenant, --region, --buckets or --range"),
    };
    let req = MoveRequest {
        distribution: args.distribution.clone(),
        unit,
        target: args.to,
        ack_timeout: args.shards.ack_timeout.into(),
        skip_marker_wait: args.unsafe_skip_marker_wait,
        stop_after: args.shards.stop_after()?,
        hold: args.hold,
        pause_after_copy: args.unsafe_pause_after_copy.map(Into::into),
        copy: args.shards.copy_streams(),
    };
    let (mut cat, _) = Catalog::connect(dsn)
        .await
        .context("connecting to the catalog")?;
    cat.migrate().await?;
    let progress = bars::Bars::new("", json);
    match rebalance::run(&cat, &shards, &req, &progress).await {
        Ok(r) => {
            let cols = [
                "move",
                "source",
                "target",
                "rows_copied",
                "bytes_copied",
                "copy_ms",
                "changes_applied",
                "catchup_ms",
                "apply_ms",
                "pause_ms",
                "fence_ack_ms",
                "marker_ms",
                "groups_verified",
                "rows_verified",
                "rows_deleted_on_source",
            ]
            .map(String::from);
            let vals = vec![
                r.id.to_string(),
                r.source.to_string(),
                r.target.to_string(),
                r.rows_copied.to_string(),
                r.bytes_copied.to_string(),
                r.copy_ms.to_string(),
                r.changes_applied.to_string(),
                r.catchup_ms.to_string(),
                format!("{:.1}", r.apply_ms),
                format!("{:.1}", r.pause_ms),
                format!("{:.1}", r.fence_ack_ms),
                format!("{:.1}", r.marker_ms),
                r.groups_verified.to_string(),
                r.rows_verified.to_string(),
                r.rows_deleted_on_source.to_string(),
            ];
            print_rows("move", &cols, &[vals], json);
            Ok(0)
        }
        Err(e @ MoveError::Stopped(_)) => {
            eprintln!("shardctl move: {e}");
            Ok(4)
        }
        Err(e @ MoveError::Mismatch(_)) => {
            eprintln!("shardctl move: {e}\nthe unit was switched; its rows are still on the source shard (`shardctl abort` moves it back)");
            Ok(3)
        }
        Err(e) => {
            eprintln!("shardctl move: {e}");
            Ok(2)
        }
    }
}

/// Plans moves for a distribution and, with `apply`, runs them one at a time; the exit status.
async fn rebalance_cmd(
    dsn: &str,
    args: &PlanArgs,
    drain: Option<usize>,
    apply: bool,
    json: bool,
) -> anyhow::Result<i32> {
    use pgshard::rebalance::{self, plan, MoveError, MoveRequest, UnitSpec};
    let links = shard_links(&args.shards).await?;
    let (mut cat, _) = Catalog::connect(dsn)
        .await
        .context("connecting to the catalog")?;
    cat.migrate().await?;
    let row = cat
        .latest_map()
        .await?
        .context("the catalog holds no map yet")?;
    let map = ShardMap::build(&row.sharding, row.shards, row.version)?;
    let dist = map
        .distributions
        .iter()
        .position(|d| d.name == args.distribution)
        .with_context(|| format!("no distribution {}", args.distribution))?;
    let owner = plan::placement(&map, dist)
        .context("only hash and tenant distributions are planned by bucket")?
        .to_vec();
    let rows = plan::bucket_rows(&links, &map, dist).await?;
    let moves = plan::plan(
        &owner,
        &rows,
        map.shards,
        drain,
        args.tolerance,
        args.max_moves,
    );
    let per_shard = |owner: &[usize]| {
        let mut l = vec![0i64; map.shards];
        owner.iter().zip(&rows).for_each(|(&s, &r)| l[s] += r);
        l
    };
    let mut after = owner.clone();
    for m in &moves {
        for r in &m.buckets {
            (r[0]..=r[1]).for_each(|b| after[b as usize] = m.to);
        }
    }
    let (before, after) = (per_shard(&owner), per_shard(&after));
    let shard_rows: Vec<Vec<String>> = (0..map.shards)
        .map(|s| vec![s.to_string(), before[s].to_string(), after[s].to_string()])
        .collect();
    print_rows(
        "rows per shard",
        &["shard".into(), "now".into(), "after plan".into()],
        &shard_rows,
        json,
    );
    let plan_rows: Vec<Vec<String>> = moves
        .iter()
        .enumerate()
        .map(|(i, m)| {
            vec![
                (i + 1).to_string(),
                plan::ranges_text(&m.buckets),
                m.from.to_string(),
                m.to.to_string(),
                m.rows.to_string(),
            ]
        })
        .collect();
    print_rows(
        "plan",
        &[
            "step".into(),
            "buckets".into(),
            "from".into(),
            "to".into(),
            "rows".into(),
        ],
        &plan_rows,
        json,
    );
    if !apply {
        if !json {
            eprintln!("dry run: nothing moved (rebalance --apply runs the plan)");
        }
        return Ok(0);
    }
    for (i, m) in moves.iter().enumerate() {
        let req = MoveRequest {
            distribution: args.distribution.clone(),
            unit: UnitSpec::Buckets(m.buckets.clone()),
            target: m.to,
            ack_timeout: args.shards.ack_timeout.into(),
            skip_marker_wait: false,
            stop_after: None,
            hold: false,
            pause_after_copy: None,
            copy: args.shards.copy_streams(),
        };
        let progress = bars::Bars::new(format!("[{}/{}] ", i + 1, moves.len()), json);
        match rebalance::run(&cat, &links, &req, &progress).await {
            Ok(r) => {
                if !json {
                    eprintln!(
                        "[{}/{}] moved {} rows, pause {:.1} ms",
                        i + 1,
                        moves.len(),
                        r.rows_copied,
                        r.pause_ms
                    );
                }
            }
            Err(e) => {
                eprintln!("shardctl rebalance: step {}: {e}", i + 1);
                return Ok(if matches!(e, MoveError::Mismatch(_)) {
                    3
                } else {
                    2
                });
            }
        }
    }
    Ok(0)
}

/// How to reach each shard's primary, from the routers' config file.
async fn shard_links(args: &ShardArgs) -> anyhow::Result<Vec<pgshard::rebalance::ShardLink>> {
    let cfg = pgshard::config::Config::load(&args.config)
        .with_context(|| format!("loading {}", args.config.display()))?;
    let db = match &args.database {
        Some(d) => cfg
            .database(d)
            .with_context(|| format!("database {d} is not in the config"))?,
        None => cfg
            .databases
            .iter()
            .find(|d| d.sharded)
            .context("the config has no sharded database")?,
    };
    let user = match &args.server_user {
        Some(u) => cfg
            .users
            .iter()
            .find(|x| &x.name == u)
            .with_context(|| format!("user {u} is not in the config"))?,
        None => cfg.users.first().context("the config has no users")?,
    };
    let password = pgshard::app::server_password(user);
    let database = db
        .server_database
        .clone()
        .unwrap_or_else(|| db.name.clone());
    let pw = password
        .as_deref()
        .map(|p| {
            format!(
                " password='{}'",
                p.replace('\\', "\\\\").replace('\'', "\\'")
            )
        })
        .unwrap_or_default();
    let dsn = |h: &str, p: u16| {
        format!(
            "host={h} port={p} user='{}' dbname='{database}'{pw}",
            user.name
        )
    };
    let mut shards = Vec::new();
    for s in &cfg.shards {
        let mut nodes = Vec::new();
        for a in std::iter::once(&s.primary).chain(&s.replicas) {
            nodes.push(
                pgshard::config::split_host_port(a)
                    .with_context(|| format!("bad shard address {a}"))?,
            );
        }
        // After a failover the configured primary is gone or a standby: a replica promoted in
        // its place is where the move must read and write, as routers do.
        let mut primary = 0;
        for (i, (h, p)) in nodes.iter().enumerate() {
            if pgshard::rebalance::writable(&dsn(h, *p)).await {
                primary = i;
                break;
            }
        }
        let (host, port) = nodes.remove(primary);
        shards.push(pgshard::rebalance::ShardLink {
            replicas: nodes.iter().map(|(h, p)| dsn(h, *p)).collect(),
            dsn: dsn(&host, port),
            connect: pgshard::backend::ConnectParams {
                host,
                port,
                user: user.name.clone(),
                database: database.clone(),
                password: password.clone(),
                connect_timeout: cfg.general.server_connect_timeout,
                max_message_size: cfg.general.max_message_size,
            },
        });
    }
    Ok(shards)
}

/// `0-255,1024` → [[0, 255], [1024, 1024]].
/// `LO..HI`, `..HI` or `LO..`: integer bounds stay integers, anything else is text.
fn parse_range(s: &str) -> anyhow::Result<pgshard::shardmap::config::KeyRange> {
    use pgshard::shardmap::config::Bound;
    let (lo, hi) = s
        .split_once("..")
        .context("a range is written LO..HI (either side may be empty)")?;
    let bound = |b: &str| match b {
        "" => None,
        b => Some(
            b.parse::<i64>()
                .map(Bound::Int)
                .unwrap_or_else(|_| Bound::Text(b.to_string())),
        ),
    };
    Ok(pgshard::shardmap::config::KeyRange {
        lo: bound(lo),
        hi: bound(hi),
    })
}

fn parse_buckets(s: &str) -> anyhow::Result<Vec<[u32; 2]>> {
    s.split(',')
        .map(|part| {
            let part = part.trim();
            let (a, b) = part.split_once('-').unwrap_or((part, part));
            Ok([
                a.trim()
                    .parse()
                    .with_context(|| format!("bad bucket {a}"))?,
                b.trim()
                    .parse()
                    .with_context(|| format!("bad bucket {b}"))?,
            ])
        })
        .collect()
}

/// The admin console of the router named on the command line.
async fn console(cli: &Cli) -> anyhow::Result<tokio_postgres::Client> {
    let conn = format!(
        "host={} port={} user={} password='{}' dbname=pgshard",
        cli.host,
        cli.port,
        cli.user,
        cli.password.replace('\'', "\\'")
    );
    let (client, connection) = tokio_postgres::connect(&conn, NoTls)
        .await
        .with_context(|| {
            format!(
                "connecting to the pgshard admin console at {}:{}",
                cli.host, cli.port
            )
        })?;
    tokio::spawn(connection);
    Ok(client)
}

async fn catalog_status(dsn: &str, json: bool) -> anyhow::Result<()> {
    let (cat, _) = Catalog::connect(dsn)
        .await
        .context("connecting to the catalog")?;
    let Some(map) = cat.latest_map().await? else {
        println!("catalog: no map published yet");
        return Ok(());
    };
    let routers = cat.routers().await?;
    print_rows(
        "catalog",
        &["map_version".into(), "shards".into(), "note".into()],
        &[vec![
            map.version.to_string(),
            map.shards.to_string(),
            map.note.clone(),
        ]],
        json,
    );
    let rows: Vec<Vec<String>> = routers
        .iter()
        .map(|r| {
            let state = if r.lease_left < 0.0 {
                "expired"
            } else if r.acked_version == map.version {
                "current"
            } else {
                "behind"
            };
            vec![
                r.router_id.clone(),
                r.addr.clone(),
                r.acked_version.to_string(),
                format!("{:.1}", r.lease_left),
                state.into(),
            ]
        })
        .collect();
    let cols = [
        "router_id",
        "addr",
        "acked_version",
        "lease_left_s",
        "state",
    ]
    .map(String::from);
    print_rows("routers", &cols, &rows, json);
    let built = ShardMap::build(&map.sharding, map.shards, map.version)?;
    let cols = ["distribution", "strategy", "shard", "units"].map(String::from);
    print_rows("units", &cols, &units(&built), json);
    let mut moves = Vec::new();
    for m in &built.motions {
        let state: Option<String> = cat
            .client()
            .query_opt("SELECT state || CASE WHEN detail = '' THEN '' ELSE ': ' || detail END FROM pgshard.moves WHERE id = $1", &[&(m.id as i64)])
            .await?
            .map(|r| r.get(0));
        let dist = &built.distributions[m.dist].name;
        moves.push(vec![
            m.id.to_string(),
            dist.clone(),
            m.describe(),
            m.source.to_string(),
            m.target.to_string(),
            format!("{:?}", m.phase).to_lowercase(),
            state.unwrap_or_default(),
        ]);
    }
    let cols = [
        "move",
        "distribution",
        "unit",
        "source",
        "target",
        "phase",
        "state",
    ]
    .map(String::from);
    print_rows("moves in flight", &cols, &moves, json);
    Ok(())
}

/// What each shard holds of each distribution: buckets, pinned tenants, ranges, regions.
fn units(map: &ShardMap) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for d in &map.distributions {
        for shard in 0..map.shards {
            let (strategy, what) = match &d.strategy {
                Strategy::Hash { bucket_shard } => (
                    "hash",
                    format!(
                        "{} buckets",
                        bucket_shard.iter().filter(|&&s| s == shard).count()
                    ),
                ),
                Strategy::Tenant {
                    directory,
                    bucket_shard,
                } => (
                    "tenant",
                    format!(
                        "{} buckets, {} pinned tenants",
                        bucket_shard.iter().filter(|&&s| s == shard).count(),
                        directory.values().filter(|&&s| s == shard).count()
                    ),
                ),
                Strategy::Range { ranges } => (
                    "range",
                    format!("{} ranges", ranges.iter().filter(|r| r.2 == shard).count()),
                ),
                Strategy::Geo { regions, .. } => (
                    "geo",
                    format!(
                        "{} regions",
                        regions.values().filter(|g| g.contains(&shard)).count()
                    ),
                ),
            };
            out.push(vec![
                d.name.clone(),
                strategy.into(),
                shard.to_string(),
                what,
            ]);
        }
    }
    out
}

/// Column names and text values of a simple query's rows.
fn table(msgs: &[SimpleQueryMessage]) -> (Vec<String>, Vec<Vec<String>>) {
    let rows: Vec<_> = msgs
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .collect();
    let cols = rows
        .first()
        .map(|r| r.columns().iter().map(|c| c.name().to_string()).collect())
        .unwrap_or_default();
    let vals = rows
        .iter()
        .map(|r| {
            (0..r.len())
                .map(|i| r.get(i).unwrap_or("").to_string())
                .collect()
        })
        .collect();
    (cols, vals)
}

fn print_rows(title: &str, cols: &[String], rows: &[Vec<String>], json: bool) {
    if json {
        let items: Vec<String> = rows
            .iter()
            .map(|r| {
                let fields: Vec<String> = cols
                    .iter()
                    .zip(r)
                    .map(|(c, v)| format!("{c:?}:{v:?}"))
                    .collect();
                format!("{{{}}}", fields.join(","))
            })
            .collect();
        println!("{{\"{title}\":[{}]}}", items.join(","));
        return;
    }
    println!("{title}:");
    println!("  {}", cols.join(" | "));
    for r in rows {
        println!("  {}", r.join(" | "));
    }
}
