//! What the benchmarks read from their environment and from `/proc`.

/// The number in the environment variable `name`, else `default`; an unparsable value is an
/// error naming the variable.
pub fn env_usize(name: &str, default: usize) -> anyhow::Result<usize> {
    match std::env::var(name) {
        Ok(value) => {
            (value.parse()).map_err(|e| anyhow::anyhow!("{name}=`{value}` is not a number: {e}"))
        }
        Err(_) => Ok(default),
    }
}

/// Clock ticks per second of `/proc/<pid>/stat` (`USER_HZ`, 100 on Linux).
const USER_HZ: f64 = 100.0;

/// User + system CPU-seconds of process `pid` (`"self"` for this one) so far, all its
/// threads; with `children`, those of its children it has waited for instead.
pub fn cpu_seconds(pid: &str, children: bool) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The fields after the parenthesised command name: utime, stime, cutime and cstime are
    // fields 14 to 17 of the file, 11 to 14 here.
    let rest = (stat.rsplit_once(')').map(|(_, r)| r))
        .ok_or_else(|| anyhow::anyhow!("unexpected /proc/{pid}/stat: {stat}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let first = if children { 13 } else { 11 };
    let ticks: f64 = fields[first].parse::<f64>()? + fields[first + 1].parse::<f64>()?;
    Ok(ticks / USER_HZ)
}
