//! The wrapped command of `switchyard register ... -- CMD ARGS...`.
//!
//! The command runs as a child with our stdin/stdout/stderr, in our process group (like `tini`):
//! SIGTERM/SIGINT sent to the registrar are forwarded to it. Its exit status becomes ours, with
//! 128+N when it was killed by signal N, as a shell reports it.

use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};

use tokio::process::{Child, Command};
use tracing::{info, warn};

use super::RegisterError;

/// A running wrapped command.
pub struct Wrapped {
    child: Child,
    pid: Option<u32>,
    command: String,
}

impl Wrapped {
    /// Starts `command[0]` with the rest as arguments.
    #[allow(unsafe_code)] // prctl(2) between fork and exec
    pub fn spawn(command: &[String]) -> Result<Wrapped, RegisterError> {
        let shown = command.join(" ");
        let Some((program, args)) = command.split_first() else {
            return Err(RegisterError::Spawn {
                command: shown,
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty command"),
            });
        };
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::inherit())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit());
        // If the registrar dies without forwarding (kill -9), the command gets SIGTERM rather than
        // running on as an orphan that nobody registers.
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| RegisterError::Spawn {
            command: shown.clone(),
            source,
        })?;
        let pid = child.id();
        info!(command = %shown, pid = ?pid, "command started");
        Ok(Wrapped {
            child,
            pid,
            command: shown,
        })
    }

    /// Sends `signal` ("TERM", "INT") to the child.
    #[allow(unsafe_code)] // kill(2)
    pub fn forward(&mut self, signal: &str) {
        let Some(pid) = self.pid else { return };
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        info!(pid, signal, "forwarding signal to the command");
        let signum = match signal {
            "INT" => libc::SIGINT,
            _ => libc::SIGTERM,
        };
        let Ok(pid_t) = libc::pid_t::try_from(pid) else {
            return;
        };
        // SAFETY: kill(2) with a pid we spawned and have not reaped (try_wait above said running).
        if unsafe { libc::kill(pid_t, signum) } == -1 {
            let e = std::io::Error::last_os_error();
            warn!(pid, signal, error = %e, "kill(2) failed; killing the command with SIGKILL");
            let _ = self.child.start_kill();
        }
    }

    /// Waits for the child to exit; returns the exit code to pass on.
    pub async fn wait(&mut self) -> u8 {
        match self.child.wait().await {
            Ok(status) => {
                let code = exit_code(status);
                info!(command = %self.command, status = %status, code, "command exited");
                code
            }
            Err(e) => {
                warn!(command = %self.command, error = %e, "cannot wait for the command");
                1
            }
        }
    }
}

/// Exit code of a finished process, as a shell reports it: its code, or 128+signal.
pub fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code).unwrap_or(1),
        (None, Some(sig)) => u8::try_from(128 + sig).unwrap_or(1),
        (None, None) => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_shell() {
        assert_eq!(exit_code(ExitStatus::from_raw(7 << 8)), 7);
        assert_eq!(exit_code(ExitStatus::from_raw(0)), 0);
        // killed by SIGTERM (15)
        assert_eq!(exit_code(ExitStatus::from_raw(15)), 143);
    }
}
