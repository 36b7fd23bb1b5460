//! What a durable NV_Write costs at least, and what each backend pays:
//!
//! * [`Floor`]: the physical limit of one durable commit, one write of the
//!   state file's size over a preallocated file in the state directory plus
//!   one fdatasync (no rename, no directory flush, no size change);
//! * [`flushes_per_write`]: device flushes per NV_Write, counted with
//!   `strace -c` on the backend process (fsync, fdatasync,
//!   sync_file_range and msync calls; every thread followed).

use crate::report::{stat, us, Stat};
use crate::targets::{Remote, Target};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vtpm_test_support::cmd as c;

/// The name the floor file gets in a state directory (no backend reads it).
const FLOOR_FILE: &str = "bench-durability-floor.bin";

/// One write of `size` bytes at offset 0 of a preallocated file, then one
/// fdatasync. As a [`Target`] every "command" is one such commit, answered
/// with an empty success response, so it can be timed alternately with the
/// backends in the same loop.
pub(crate) struct Floor {
    file: File,
    buf: Vec<u8>,
    round: u8,
}

impl Floor {
    pub(crate) fn new(dir: &Path, size: usize) -> Floor {
        let path = dir.join(FLOOR_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("floor file");
        let buf = vec![0x5a; size.max(1)];
        // Allocated and on disk before the first timed commit, as a state
        // file being overwritten is.
        file.write_all_at(&buf, 0).unwrap();
        file.sync_all().unwrap();
        Floor {
            file,
            buf,
            round: 0,
        }
    }

    pub(crate) fn commit(&mut self) {
        self.round = self.round.wrapping_add(1);
        self.buf[0] = self.round;
        self.file.write_all_at(&self.buf, 0).unwrap();
        self.file.sync_data().unwrap();
    }
}

impl Target for Floor {
    fn name(&self) -> &str {
        "durability floor"
    }
    fn cmd(&mut self, _: &[u8]) -> Vec<u8> {
        self.commit();
        vec![0x80, 0x01, 0, 0, 0, 10, 0, 0, 0, 0]
    }
}

/// The size of the TPM's permanent state as swtpm stores it
/// (`tpm2-00.permall`), the amount one durable commit has to write.
pub(crate) fn state_size(dir: &Path) -> usize {
    std::fs::metadata(dir.join("tpm2-00.permall")).map_or(4096, |m| m.len() as usize)
}

/// The floor timed in each of `dirs` alternately, `iters` commits each.
pub(crate) fn floor_row(dirs: &[PathBuf], size: usize, iters: usize) -> Vec<Stat> {
    let mut floors: Vec<Floor> = dirs.iter().map(|d| Floor::new(d, size)).collect();
    let mut samples = vec![Vec::with_capacity(iters); floors.len()];
    let n = floors.len();
    for i in 0..iters {
        for j in 0..n {
            let k = (i + j) % n;
            let t = Instant::now();
            floors[k].commit();
            samples[k].push(us(t.elapsed()));
        }
    }
    for d in dirs {
        let _ = std::fs::remove_file(d.join(FLOOR_FILE));
    }
    samples.into_iter().map(stat).collect()
}

/// Whether strace is there to count flushes.
pub(crate) fn have_strace() -> bool {
    Command::new("strace")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether every thread of `pid` is being traced.
fn all_traced(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    let mut any = false;
    for t in tasks.flatten() {
        any = true;
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let tracer = status
            .lines()
            .find_map(|l| l.strip_prefix("TracerPid:"))
            .map(str::trim);
        if matches!(tracer, None | Some("0")) {
            return false;
        }
    }
    any
}

/// Calls counted in an `strace -c` summary, summed over all syscalls.
fn summed_calls(summary: &str) -> u64 {
    // "% time     seconds  usecs/call     calls    errors syscall": the
    // calls column is the 4th; the "total" line is left out.
    summary
        .lines()
        .filter(|l| !l.contains("total") && !l.starts_with('%') && !l.starts_with('-'))
        .filter_map(|l| l.split_whitespace().nth(3)?.parse::<u64>().ok())
        .sum()
}

/// Device flushes per NV_Write on `t` (NV index `index` defined, 64 bytes):
/// strace attached to every thread of the backend, `writes` NV_Writes,
/// strace detached, its count divided by `writes`.
pub(crate) fn flushes_per_write(t: &mut Remote, index: u32, writes: usize) -> f64 {
    let out = t.dir.path().join("strace.txt");
    let mut tracer = Command::new("strace")
        .args(["-f", "-c", "-q", "-e"])
        .arg("trace=fsync,fdatasync,sync_file_range,msync")
        .arg("-o")
        .arg(&out)
        .arg("-p")
        .arg(t.child.id().to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("strace");
    let start = Instant::now();
    while !all_traced(t.child.id()) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "strace did not attach to {}",
            t.name
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    for i in 0..writes {
        let r = t.cmd(&c::nv_write(index, &[(i % 251) as u8 + 7; 64]));
        assert_eq!(c::rc(&r), 0, "{}: NV_Write under strace", t.name);
    }
    // strace prints its summary when interrupted.
    let _ = Command::new("kill")
        .args(["-INT", &tracer.id().to_string()])
        .status();
    let _ = tracer.wait();
    let summary = std::fs::read_to_string(&out).unwrap_or_default();
    summed_calls(&summary) as f64 / writes as f64
}

#[cfg(test)]
mod tests {
    use super::summed_calls;

    #[test]
    fn strace_summary_calls_are_summed_without_the_total() {
        let s = "% time     seconds  usecs/call     calls    errors syscall\n\
                 ------ ----------- ----------- --------- --------- ----------------\n\
                  60.00    0.000600         300         2           fsync\n\
                  40.00    0.000400         100         4           fdatasync\n\
                 ------ ----------- ----------- --------- --------- ----------------\n\
                 100.00    0.001000         166         6           total\n";
        assert_eq!(summed_calls(s), 6);
        assert_eq!(summed_calls(""), 0);
        assert_eq!(summed_calls("garbage\nmore garbage x y z\n"), 0);
    }
}
