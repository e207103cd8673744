//! `veil replay` on endless input that is not a kmem trace (what `veil replay /dev/urandom`
//! gets) stops by itself with the reason and exit code 2, also with `--quiet`. The input is a
//! generator of random bytes written into the replay's standard input until the replay closes
//! it (a watchdog kills the replay if it does not).

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn endless_random_input_gives_up_with_exit_code_2() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_veil"))
        .args(["replay", "-", "--quiet"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run veil");
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut buf = vec![0u8; 64 * 1024];
        let mut written = 0u64;
        loop {
            for chunk in buf.chunks_mut(8) {
                // xorshift64*
                state ^= state >> 12;
                state ^= state << 25;
                state ^= state >> 27;
                let r = state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
                chunk.copy_from_slice(&r[..chunk.len()]);
            }
            if stdin.write_all(&buf).is_err() {
                return written;
            }
            written += buf.len() as u64;
        }
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(300) {
            let _ = child.kill();
            panic!("veil replay still reading random input after 300 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let written = writer.join().unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("not a kmem trace"), "{err}");
    assert!(err.contains("malformed"), "{err}");
    assert!(out.stdout.is_empty());
    // It stopped near the limits (2^20 lines or 256 MiB), not at the end of some input.
    assert!(written <= (256 + 64) << 20, "{written} bytes written");
    assert!(written >= 64 << 20, "{written} bytes written");
}
