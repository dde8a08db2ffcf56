//! A memory bomb is classed `oom` and the host's own memory stays bounded.

use crate::WEIR;
use weir_tests::{Weir, error_field, faulty_events, plugin, read_json_lines, read_lines};

/// Runs `weir` with `args` to completion; its exit code and its own peak resident set in
/// MiB (from `wait4`, so other processes of the test binary, such as brokers, do not count).
#[expect(clippy::zombie_processes, reason = "reaped by wait4, not by std")]
fn run_measured(weir: &Weir, args: &[&std::ffi::OsStr]) -> (i32, u64) {
    let child = weir.command(args).spawn().expect("spawn weir");
    let pid = libc::pid_t::try_from(child.id()).expect("pid");
    let mut status = 0;
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: wait4 on our own child, writing into a status int and a rusage struct we own;
    // `child` is never waited for by std after this.
    #[allow(unsafe_code)]
    let usage = unsafe {
        assert_eq!(libc::wait4(pid, &mut status, 0, usage.as_mut_ptr()), pid);
        usage.assume_init()
    };
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    (code, (usage.ru_maxrss as u64) / 1024) // kilobytes on Linux
}

#[test]
fn memory_bomb_is_oom_and_host_memory_stays_bounded() {
    let weir = Weir::new(WEIR);
    // Five bombs, each would take the whole 4 GiB wasm32 address space without the cap.
    let lines = faulty_events(100, |i| (i % 20 == 3).then_some("memory"));
    let input = weir.write_lines("in.jsonl", lines);
    let faulty = plugin("faulty");
    let args = [
        "run".as_ref(),
        "--plugin".as_ref(),
        faulty.as_os_str(),
        "--input".as_ref(),
        input.as_os_str(),
    ]
    .into_iter()
    .chain(
        [
            "--output",
            "out.jsonl",
            "--state",
            "state",
            "--quiet",
            "--id",
            "/id",
            "--memory-mb",
            "64",
            "--deadline-ms",
            "5000",
            "--batch-size",
            "10",
        ]
        .map(std::ffi::OsStr::new),
    )
    .collect::<Vec<_>>();
    let (code, peak) = run_measured(&weir, &args);
    assert_eq!(code, 0, "weir run failed");
    let outputs = read_lines(&weir.path("out.jsonl"));
    let dead_letters = read_json_lines(&weir.path("out.dlq.jsonl"));
    let classes: Vec<String> = dead_letters
        .iter()
        .map(|d| error_field(d, "class"))
        .collect();
    assert_eq!(classes.len(), 5, "{classes:?}");
    assert!(classes.iter().all(|class| class == "oom"), "{classes:?}");
    assert_eq!(outputs.len(), 95);
    println!("peak RSS of the weir process: {peak} MiB (memory cap 64 MiB per instance)");
    assert!(peak < 512, "weir's peak RSS was {peak} MiB");
}
