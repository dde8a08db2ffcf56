//! The Redis state store against a real Redis: fencing tokens rise, a held lease is never
//! granted twice, only the holder can finish, done marks deduplicate, a batch costs one
//! script call each way, and fences and done marks (not leases) survive a `kill -9` restart
//! (AOF). Plugins' keyed state: a worker that lost a partition's state can no longer write it
//! (the lost update a rebalance would otherwise make). Also the plugin registry that a cluster's workers share in Redis, and the store on
//! a real 3-master Redis Cluster through a master's failover.

use std::time::Duration;

use weir::state::keyed::KeyedWrite;
use weir::state::{
    Claim, Commit, DEFAULT_CLUSTER_BUCKETS, RedisStore, RedisTarget, StateStore, Turn,
    read_redis_keyed_state,
};
use weir_tests::redis_cluster::RedisCluster;
use weir_tests::redis_server::RedisServer;

async fn store(redis: &RedisServer, owner: &str, lease_ms: u64) -> RedisStore {
    store_at(&redis.target(), owner, lease_ms).await
}

async fn store_at(target: &RedisTarget, owner: &str, lease_ms: u64) -> RedisStore {
    RedisStore::connect(
        target,
        "test-pipeline",
        owner,
        Duration::from_millis(lease_ms),
        None,
    )
    .await
    .expect("connect")
}

fn ids(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| (*s).to_owned()).collect()
}

fn fence(claim: Claim) -> u64 {
    match claim {
        Claim::Leased { fence, .. } => fence,
        other => panic!("expected a lease, got {other:?}"),
    }
}

/// Calls of each Redis command so far (from INFO commandstats).
async fn command_calls(url: &str, command: &str) -> u64 {
    let client = redis::Client::open(url).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .expect("info");
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|rest| rest.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn leases_fences_and_done_marks() {
    let redis = RedisServer::start();
    let a = store(&redis, "worker-a", 60_000).await;
    let b = store(&redis, "worker-b", 60_000).await;

    // One claim call's new leases share one fence; a later call's fence is higher.
    let claims = a.claim(&ids(&["r1", "r2"])).await.expect("claim");
    let (f1, f2) = (fence(claims[0]), fence(claims[1]));
    assert_eq!(f1, f2, "one fence per claim call");
    let later = fence(a.claim(&ids(&["r3"])).await.expect("claim")[0]);
    assert!(later > f1, "fences rise: {f1} then {later}");

    // Held by a: b is told so (it must park the record, never skip it).
    assert_eq!(
        b.claim(&ids(&["r1"])).await.expect("claim"),
        vec![Claim::HeldElsewhere]
    );
    // a asking again keeps its lease and fence.
    assert_eq!(
        a.claim(&ids(&["r1"])).await.expect("claim"),
        vec![Claim::Leased {
            fence: f1,
            crashes: 0
        }]
    );

    // Only the holder, with its fence, can finish.
    assert_eq!(
        b.finish(&[("r1".into(), f1)]).await.expect("finish"),
        vec![false]
    );
    assert_eq!(
        a.finish(&[("r1".into(), f1 + 100)]).await.expect("finish"),
        vec![false]
    );
    assert_eq!(
        a.finish(&[("r1".into(), f1), ("r2".into(), f2)])
            .await
            .expect("finish"),
        vec![true, true]
    );

    // Done for everyone now.
    assert_eq!(
        b.claim(&ids(&["r1", "r2", "r3"])).await.expect("claim")[..2],
        [Claim::Done, Claim::Done]
    );
}

#[tokio::test]
async fn an_expired_lease_goes_to_the_next_worker_and_the_stale_one_learns_it() {
    let redis = RedisServer::start();
    let a = store(&redis, "worker-a", 300).await;
    let b = store(&redis, "worker-b", 60_000).await;
    let stale = fence(a.claim(&ids(&["slow"])).await.expect("claim")[0]);
    assert_eq!(
        a.renew(&[("slow".into(), stale)]).await.expect("renew"),
        vec![true]
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    let fresh = fence(b.claim(&ids(&["slow"])).await.expect("claim")[0]);
    assert!(fresh > stale);
    assert_eq!(
        a.renew(&[("slow".into(), stale)]).await.expect("renew"),
        vec![false]
    );
    assert_eq!(
        a.finish(&[("slow".into(), stale)]).await.expect("finish"),
        vec![false],
        "a stale worker cannot finish"
    );
    let c = store(&redis, "worker-c", 60_000).await;
    assert_eq!(
        c.claim(&ids(&["slow"])).await.expect("claim"),
        vec![Claim::HeldElsewhere],
        "the stale finish left b's lease in place"
    );
    assert_eq!(
        b.finish(&[("slow".into(), fresh)]).await.expect("finish"),
        vec![true]
    );
    assert_eq!(
        a.finish(&[("slow".into(), stale)]).await.expect("finish"),
        vec![false],
        "nor after b finished"
    );
    assert_eq!(
        c.claim(&ids(&["slow"])).await.expect("claim"),
        vec![Claim::Done],
        "b's done mark is still there"
    );
}

/// A claim after a lease ran out says how many workers died (or stalled) with the record in
/// flight: each lease past its deadline adds one; a release starts it over.
#[tokio::test]
async fn claims_count_the_workers_that_died_with_a_record_in_flight() {
    let redis = RedisServer::start();
    let crashes = |claim: Claim| match claim {
        Claim::Leased { crashes, .. } => crashes,
        other => panic!("expected a lease, got {other:?}"),
    };
    let worker = |name: &'static str| {
        let redis = &redis;
        async move { store(redis, name, 200).await }
    };
    let a = worker("worker-a").await;
    assert_eq!(crashes(a.claim(&ids(&["r"])).await.expect("claim")[0]), 0);
    let again = a.claim(&ids(&["r"])).await.expect("claim")[0];
    assert_eq!(crashes(again), 0, "its own lease found again is no crash");
    // a dies with r in flight; b, then c, claim it once the lease ran out.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let b = worker("worker-b").await;
    assert_eq!(crashes(b.claim(&ids(&["r"])).await.expect("claim")[0]), 1);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let c = worker("worker-c").await;
    let claimed = c.claim(&ids(&["r", "s"])).await.expect("claim");
    assert_eq!((crashes(claimed[0]), crashes(claimed[1])), (2, 0));
    let finished = c
        .finish(&[("r".into(), fence(claimed[0]))])
        .await
        .expect("finish");
    assert_eq!(finished, vec![true]);
    let released = c
        .release(&[("s".into(), fence(claimed[1]))])
        .await
        .expect("release");
    assert_eq!(released, vec![true]);
    let d = worker("worker-d").await;
    assert_eq!(
        crashes(d.claim(&ids(&["s"])).await.expect("claim")[0]),
        0,
        "a release clears the count"
    );
    assert_eq!(
        d.claim(&ids(&["r"])).await.expect("claim"),
        vec![Claim::Done]
    );
}

#[tokio::test]
async fn an_expired_lease_nobody_took_can_still_be_finished() {
    let redis = RedisServer::start();
    let a = store(&redis, "worker-a", 200).await;
    let b = store(&redis, "worker-b", 60_000).await;
    let f = fence(a.claim(&ids(&["late"])).await.expect("claim")[0]);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        a.finish(&[("late".into(), f)]).await.expect("finish"),
        vec![true],
        "its outputs are durable and nobody else took the record"
    );
    assert_eq!(
        b.claim(&ids(&["late"])).await.expect("claim"),
        vec![Claim::Done]
    );
    assert_eq!(
        a.finish(&[("late".into(), f)]).await.expect("finish"),
        vec![true],
        "finishing again (a retried call) is answered the same"
    );
}

/// A batch of partition 0 whose record `id` (leased with `fence`) sets `count` to `value`,
/// run under `epochs`.
async fn finish_count(
    store: &RedisStore,
    id: &str,
    fence: u64,
    value: &str,
    epochs: &[(i32, u64)],
) -> bool {
    let commit = Commit {
        writes: vec![KeyedWrite {
            partition: 0,
            key: b"count".to_vec(),
            value: Some(value.as_bytes().to_vec()),
            expires_ms: None,
        }],
        partitions: vec![0],
        epochs: epochs.to_vec(),
        ..Commit::default()
    };
    let held = (store.finish_with(&[(id.to_owned(), fence)], commit, Turn::free()))
        .await
        .expect("finish");
    held[0]
}

#[tokio::test]
async fn keyed_state_taken_over_is_out_of_the_old_owners_reach() {
    let redis = RedisServer::start();
    let keyed = |store: RedisStore| store.keep_keyed_state("counter").expect("one server");
    let a = keyed(store(&redis, "worker-a", 60_000).await);
    let b = keyed(store(&redis, "worker-b", 60_000).await);
    let count = |store: &RedisStore| {
        let value = store.keyed().expect("keyed").get(0, b"count").expect("get");
        value.map(|v| String::from_utf8(v).expect("utf-8"))
    };
    let in_redis = || async {
        let entries = read_redis_keyed_state(&redis.target(), "test-pipeline", "counter")
            .await
            .expect("read");
        (entries.iter())
            .map(|e| String::from_utf8_lossy(&e.value).into_owned())
            .collect::<Vec<_>>()
    };

    // a is assigned partition 0 (assignment 1) and counts r1.
    let held_a = a.own_keyed(&[(0, 1)]).await.expect("own");
    assert_eq!(held_a.restored.len(), 1, "taken over and loaded");
    let r1 = fence(a.claim(&ids(&["r1"])).await.expect("claim")[0]);
    assert!(finish_count(&a, "r1", r1, "1", &held_a.epochs).await);
    assert_eq!(
        count(&a).as_deref(),
        Some("1"),
        "a reads its own durable write"
    );

    // a counts r2 (count 2, not durable yet) when a rebalance gives the partition to b.
    let r2 = fence(a.claim(&ids(&["r2"])).await.expect("claim")[0]);
    let held_b = b.own_keyed(&[(0, 1)]).await.expect("own");
    assert_eq!(held_b.restored[0].keys, 1, "b loaded what a made durable");
    assert!(held_b.epochs[0].1 > held_a.epochs[0].1, "a new epoch");
    assert_eq!(count(&b).as_deref(), Some("1"));
    // a's batch comes too late: refused, r2 not done, and its lease given up at once.
    assert!(!finish_count(&a, "r2", r2, "2", &held_a.epochs).await);
    assert_eq!(in_redis().await, ["1"], "the stale write did not land");
    let r2 = fence(b.claim(&ids(&["r2"])).await.expect("claim")[0]);
    assert!(finish_count(&b, "r2", r2, "2", &held_b.epochs).await);
    assert_eq!(in_redis().await, ["2"], "r2 counted once, by b");

    // a, still running a batch it read under the old assignment, does not take the state back.
    let stale = a.own_keyed(&[(0, 1)]).await.expect("own");
    assert!(stale.restored.is_empty(), "b holds it: {stale:?}");
    let r3 = fence(a.claim(&ids(&["r3"])).await.expect("claim")[0]);
    assert!(!finish_count(&a, "r3", r3, "3", &stale.epochs).await);
    assert_eq!(in_redis().await, ["2"]);

    // Assigned the partition anew (assignment 2), a takes it over and reads b's writes.
    let again = a.own_keyed(&[(0, 2)]).await.expect("own");
    assert_eq!(again.restored.len(), 1);
    assert_eq!(count(&a).as_deref(), Some("2"));
    let r3 = fence(a.claim(&ids(&["r3"])).await.expect("claim")[0]);
    assert!(finish_count(&a, "r3", r3, "3", &again.epochs).await);
    // And b, which lost it, is refused in turn.
    let r4 = fence(b.claim(&ids(&["r4"])).await.expect("claim")[0]);
    assert!(!finish_count(&b, "r4", r4, "4", &held_b.epochs).await);
    assert_eq!(in_redis().await, ["3"]);
}

#[tokio::test]
async fn a_batch_costs_one_script_call_each_way() {
    let redis = RedisServer::start();
    assert!(
        redis.is_local(),
        "counts commands, so it needs a server of its own"
    );
    let a = store(&redis, "worker-a", 60_000).await;
    // Warm up: the first use of each script loads it (EVALSHA, NOSCRIPT, SCRIPT LOAD, EVALSHA).
    let warm = fence(a.claim(&ids(&["warm-up"])).await.expect("claim")[0]);
    a.finish(&[("warm-up".into(), warm)]).await.expect("finish");
    let batch: Vec<String> = (0..500).map(|i| format!("id-{i}")).collect();
    let before =
        command_calls(&redis.url, "evalsha").await + command_calls(&redis.url, "eval").await;
    let claims = a.claim(&batch).await.expect("claim");
    let done: Vec<(String, u64)> = batch
        .iter()
        .cloned()
        .zip(claims.into_iter().map(fence))
        .collect();
    assert!(a.finish(&done).await.expect("finish").iter().all(|ok| *ok));
    let after =
        command_calls(&redis.url, "evalsha").await + command_calls(&redis.url, "eval").await;
    assert_eq!(
        after - before,
        2,
        "500 records: one claim script and one finish script"
    );
}

#[tokio::test]
async fn fences_and_done_marks_survive_a_redis_crash_and_leases_do_not() {
    let mut redis = RedisServer::start();
    assert!(
        redis.is_local(),
        "restarts the server, so it needs a server of its own"
    );
    let before = {
        let a = store(&redis, "worker-a", 60_000).await;
        let done = fence(a.claim(&ids(&["d"])).await.expect("claim")[0]);
        let finished = a.finish(&[("d".into(), done)]).await.expect("finish");
        assert_eq!(finished, vec![true]);
        fence(a.claim(&ids(&["x"])).await.expect("claim")[0])
    };
    redis.kill_and_restart();
    let a = store(&redis, "worker-a", 60_000).await;
    let after = fence(a.claim(&ids(&["y"])).await.expect("claim")[0]);
    assert!(
        after > before,
        "fence went from {before} to {after} across a restart"
    );
    // Done marks are in the AOF; leases are not (a's lease of x is gone with the restart).
    let b = store(&redis, "worker-b", 60_000).await;
    let claims = b.claim(&ids(&["d", "x"])).await.expect("claim");
    assert_eq!(claims[0], Claim::Done, "the done mark survived");
    assert!(
        matches!(claims[1], Claim::Leased { .. }),
        "the lease did not: {claims:?}"
    );
}

/// Two workers' plugin registries in one Redis: uploads racing under one name each get
/// their own version (compare-and-swap, no lost update), both see the same index, and a
/// change made through one is announced to the other.
#[tokio::test]
async fn two_workers_share_one_registry_in_redis() {
    use weir::registry::Registry;
    use weir::runtime::{Inspection, WIT_VERSION, World};
    async fn upload(registry: &Registry, n: usize) -> Result<u64, weir::registry::RegistryError> {
        let bytes = format!("component {n}").into_bytes();
        let inspection = Inspection {
            digest: format!("sha256:{n:064x}"),
            world: World::Batch,
            stateful: false,
            size_bytes: bytes.len(),
            wit_version: WIT_VERSION,
            exports: Vec::new(),
            imports: Vec::new(),
        };
        let (info, _) = registry.upload("p", &bytes, inspection, "test").await?;
        Ok(info.version)
    }
    let redis = RedisServer::start();
    let (a, b) = (
        Registry::connect(&redis.target()).await.expect("a"),
        Registry::connect(&redis.target()).await.expect("b"),
    );
    let mut announced = b.changes();
    announced.mark_unchanged();
    let racing = (0..20).map(|n| upload(if n % 2 == 0 { &a } else { &b }, n));
    let uploaded = futures_util::future::join_all(racing).await;
    let mut versions: Vec<u64> = uploaded.into_iter().map(|r| r.expect("upload")).collect();
    versions.sort_unstable();
    assert_eq!(versions, (1..=20).collect::<Vec<u64>>());
    assert_eq!(
        a.existing("p").await.expect("a"),
        b.existing("p").await.expect("b")
    );
    for version in a.existing("p").await.expect("a").versions {
        let n = usize::from_str_radix(&version.digest["sha256:".len()..], 16).expect("hex");
        let bytes = b.wasm("p", version.version).await.expect("bytes");
        assert_eq!(bytes, format!("component {n}").into_bytes(), "{version:?}");
    }

    a.activate("p", 3).await.expect("activate");
    tokio::time::timeout(Duration::from_secs(5), announced.changed())
        .await
        .expect("b is told of a's activation")
        .expect("registry alive");
    assert_eq!(b.existing("p").await.expect("b").active, Some(3));
}

/// On a real Redis Cluster (three masters, a replica each): a batch's ids spread over every
/// master, at most one script per bucket each way; dedup and leases hold across buckets; a
/// master killed with `kill -9` pauses the calls until its replica took over, then they
/// complete and every guarantee holds.
#[tokio::test(flavor = "multi_thread")]
async fn on_a_redis_cluster_a_batch_spreads_over_the_masters_and_survives_a_failover() {
    let mut cluster = tokio::task::block_in_place(RedisCluster::start);
    let target = cluster.target();
    let a = store_at(&target, "worker-a", 60_000).await;
    let b = store_at(&target, "worker-b", 60_000).await;
    // Warm up: the first use of a script on a node loads it.
    let warm: Vec<String> = (0..500).map(|i| format!("warm-{i}")).collect();
    for store in [&a, &b] {
        store.claim(&warm).await.expect("claim");
    }
    let scripts = || {
        let (evalsha, eval) = (
            cluster.calls_per_master("evalsha"),
            cluster.calls_per_master("eval"),
        );
        evalsha
            .iter()
            .zip(eval)
            .map(|(s, e)| s + e)
            .collect::<Vec<u64>>()
    };

    let batch: Vec<String> = (0..2_000).map(|i| format!("id-{i}")).collect();
    let before = scripts();
    let claims = a.claim(&batch).await.expect("claim");
    let per_master: Vec<u64> = (scripts().iter().zip(&before))
        .map(|(after, before)| after - before)
        .collect();
    println!("one claim of 2000 ids: scripts per master {per_master:?}");
    assert_eq!(per_master.len(), 3);
    assert!(
        per_master.iter().all(|&n| n >= 1),
        "every master takes part: {per_master:?}"
    );
    assert!(
        per_master.iter().sum::<u64>() <= DEFAULT_CLUSTER_BUCKETS as u64,
        "one script per bucket at most: {per_master:?}"
    );
    let done: Vec<(String, u64)> = (batch.iter().cloned())
        .zip(claims.iter().map(|&c| fence(c)))
        .collect();
    assert!(
        (b.claim(&batch).await.expect("claim").iter()).all(|c| *c == Claim::HeldElsewhere),
        "held by a, on whichever master"
    );

    // A master dies; a's finish waits for its replica to take over, then lands.
    let victim = cluster.masters()[0];
    cluster.kill(victim);
    let killed = std::time::Instant::now();
    let finished = a.finish(&done).await.expect("finish");
    println!(
        "master :{victim} killed: a finish of 2000 ids paused and completed after {:.1} s",
        killed.elapsed().as_secs_f64()
    );
    assert!(finished.iter().all(|ok| *ok), "a's leases were still a's");
    tokio::task::block_in_place(|| cluster.wait_until_served(Duration::from_secs(30)));
    assert!(
        (b.claim(&batch).await.expect("claim").iter()).all(|c| *c == Claim::Done),
        "every id is done for every worker after the failover"
    );
    let fresh = fence(b.claim(&ids(&["after"])).await.expect("claim")[0]);
    let newest = done.iter().map(|(_, f)| *f).max().unwrap_or(0);
    assert!(
        fresh > newest,
        "fences still rise after the failover: {newest} then {fresh}"
    );
}

/// A worker that stopped beating without signing off is noticed by the live workers of its
/// pipeline: reported once (by whichever removes its heartbeat first), with the live count;
/// another pipeline's stale heartbeat is left to that pipeline's workers.
#[tokio::test]
async fn a_stale_heartbeat_is_reported_once_by_the_workers_of_its_pipeline() {
    use std::sync::{Arc, Mutex};
    use weir::cluster::WorkerInfo;
    let redis = RedisServer::start();
    let worker = |pipeline: &str, id: &str, last_seen_ms| WorkerInfo {
        id: id.into(),
        host: "h".into(),
        pipeline: pipeline.into(),
        topic: "in".into(),
        partitions: vec![],
        plugin: "p".into(),
        plugin_version: 1,
        plugin_digest: "sha256:ab".into(),
        last_seen_ms,
    };
    let client = redis::Client::open(redis.url.as_str()).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    for dead in [worker("p", "dead", 1), worker("other", "gone", 1)] {
        let field = format!("{}/{}", dead.pipeline, dead.id);
        let json = serde_json::to_string(&dead).expect("JSON");
        let () = redis::cmd("HSET")
            .arg("weir:workers")
            .arg(field)
            .arg(json)
            .query_async(&mut conn)
            .await
            .expect("HSET");
    }
    let missed = Arc::new(Mutex::new(Vec::new()));
    let live = Arc::new(Mutex::new(0));
    let beating: Vec<_> = ["w1", "w2"]
        .map(|id| {
            let me = worker("p", id, 0);
            let (missed, live) = (missed.clone(), live.clone());
            let seen = move |now: &[WorkerInfo], gone: &[WorkerInfo]| {
                *live.lock().unwrap() = now.len();
                missed
                    .lock()
                    .unwrap()
                    .extend(gone.iter().map(|w| w.id.clone()));
            };
            tokio::spawn(weir::cluster::heartbeat(
                redis.target(),
                move || me.clone(),
                seen,
            ))
        })
        .into();
    // Two beats each (one every 2 s).
    tokio::time::sleep(Duration::from_millis(4_500)).await;
    beating.iter().for_each(|b| b.abort());
    assert_eq!(*missed.lock().unwrap(), ["dead"], "reported once");
    assert_eq!(*live.lock().unwrap(), 2, "both live workers of `p`");
    let left: Vec<String> = redis::cmd("HKEYS")
        .arg("weir:workers")
        .query_async(&mut conn)
        .await
        .expect("HKEYS");
    assert!(left.contains(&"other/gone".to_owned()), "{left:?}");
    assert!(!left.contains(&"p/dead".to_owned()), "{left:?}");
}
