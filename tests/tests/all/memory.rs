//! A memory bomb is classed `oom` and the host's own memory stays bounded. (Alone in its
//! own test binary, so the peak RSS of child processes measured here is only this run's.)

use crate::WEIR;
use weir_tests::{Weir, faulty_events, plugin};

/// Peak resident set of all waited-for child processes, in MiB.
fn children_peak_rss_mib() -> u64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a rusage struct into the pointer we pass.
    #[allow(unsafe_code)]
    let usage = unsafe {
        assert_eq!(
            libc::getrusage(libc::RUSAGE_CHILDREN, usage.as_mut_ptr()),
            0
        );
        usage.assume_init()
    };
    (usage.ru_maxrss as u64) / 1024 // kilobytes on Linux
}

#[test]
fn memory_bomb_is_oom_and_host_memory_stays_bounded() {
    let weir = Weir::new(WEIR);
    // Five bombs, each would take the whole 4 GiB wasm32 address space without the cap.
    let lines = faulty_events(100, |i| (i % 20 == 3).then_some("memory"));
    let input = weir.write_lines("in.jsonl", lines);
    let run = weir.run_pipeline(
        &plugin("faulty"),
        &input,
        &[
            "--id",
            "/id",
            "--memory-mb",
            "64",
            "--deadline-ms",
            "5000",
            "--batch-size",
            "10",
        ],
    );
    let classes = run.dead_classes();
    assert_eq!(classes.len(), 5, "{classes:?}");
    assert!(
        classes.iter().all(|(_, class)| class == "oom"),
        "{classes:?}"
    );
    assert_eq!(run.outputs.len(), 95);
    let peak = children_peak_rss_mib();
    println!("peak RSS of the weir process: {peak} MiB (memory cap 64 MiB per instance)");
    assert!(peak < 512, "weir's peak RSS was {peak} MiB");
}
