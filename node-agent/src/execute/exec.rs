//! `controller exec` on this host: run the command (as the agent's user, root) under the task's
//! timeout and cancel signal, and send its output back in pieces while it runs (at most every
//! [`FLUSH_EVERY`] or [`FLUSH_BYTES`]), so the operator sees it as it comes.
use std::sync::Arc;
use std::time::Duration;

use super::command::{self, Cancel, Cmd, CommandError};

/// How often output gathered so far is sent on.
pub const FLUSH_EVERY: Duration = Duration::from_millis(200);
/// Output sent on at once when this much has gathered.
pub const FLUSH_BYTES: usize = 16 * 1024;

/// Run `argv` to its end; every piece of output also goes to `progress`. `Ok(output)` on exit 0.
pub async fn run(
    argv: &[String],
    timeout: Duration,
    cancel: &Cancel,
    progress: Arc<dyn Fn(String) + Send + Sync>,
) -> Result<String, CommandError> {
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| CommandError::NotFound { program: "(empty command)".into(), path: String::new() })?;
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let cmd = Cmd::new(program, &args, timeout);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let forward = tokio::spawn(async move {
        let mut buf: Vec<u8> = Vec::new();
        let mut tick = tokio::time::interval(FLUSH_EVERY);
        let send = |buf: &mut Vec<u8>| {
            if !buf.is_empty() {
                progress(String::from_utf8_lossy(buf).into_owned());
                buf.clear();
            }
        };
        loop {
            tokio::select! {
                chunk = rx.recv() => match chunk {
                    Some(c) => {
                        buf.extend_from_slice(&c);
                        if buf.len() >= FLUSH_BYTES {
                            send(&mut buf);
                        }
                    }
                    None => break,
                },
                _ = tick.tick() => send(&mut buf),
            }
        }
        send(&mut buf);
    });
    let ran = command::run_streaming(&cmd, cancel, Some(tx)).await;
    // Everything it printed has been passed on before the outcome is reported.
    let _ = forward.await;
    ran?.ok(program)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[tokio::test]
    async fn output_is_passed_on_while_the_command_runs_and_failures_carry_the_exit_status() {
        let seen: Arc<Mutex<Vec<(std::time::Instant, String)>>> = Arc::default();
        let s = seen.clone();
        let progress: Arc<dyn Fn(String) + Send + Sync> =
            Arc::new(move |m| s.lock().unwrap().push((std::time::Instant::now(), m)));
        let argv: Vec<String> =
            ["sh", "-c", "echo first; sleep 1; echo second >&2"].iter().map(|a| a.to_string()).collect();
        let t0 = std::time::Instant::now();
        let out = run(&argv, Duration::from_secs(10), &Cancel::none(), progress.clone()).await.unwrap();
        assert!(out.contains("first") && out.contains("second"), "{out}");
        let seen = seen.lock().unwrap().clone();
        let first = seen.iter().find(|(_, m)| m.contains("first")).expect("first piece");
        assert!(first.0.duration_since(t0) < Duration::from_millis(900), "passed on before the command ended");
        assert!(seen.iter().any(|(_, m)| m.contains("second")), "{seen:?}");

        let fail: Vec<String> = ["sh", "-c", "echo oops; exit 3"].iter().map(|a| a.to_string()).collect();
        let err = run(&fail, Duration::from_secs(10), &Cancel::none(), progress.clone()).await.unwrap_err();
        assert!(err.to_string().contains("exit 3") && err.to_string().contains("oops"), "{err}");
        let slow: Vec<String> = ["sleep", "5"].iter().map(|a| a.to_string()).collect();
        let err = run(&slow, Duration::from_millis(300), &Cancel::none(), progress.clone()).await.unwrap_err();
        assert!(matches!(err, CommandError::Timeout { .. }), "{err}");
        let err = run(&[], Duration::from_secs(1), &Cancel::none(), progress).await.unwrap_err();
        assert!(err.to_string().contains("empty command"), "{err}");
    }
}
