//! Task reports: one message per state change of an attempt (running, then its outcome), with
//! the output bounded to its tail.
use fleetadm_proto::{TaskAssignment, TaskReport, TaskState};

/// Largest output sent in one report.
pub const MAX_REPORT_OUTPUT: usize = 32 * 1024;

/// The tail of `s`, at most [`MAX_REPORT_OUTPUT`] bytes (cut on a character boundary).
pub fn bounded(mut s: String) -> String {
    if s.len() > MAX_REPORT_OUTPUT {
        let mut start = s.len() - MAX_REPORT_OUTPUT;
        while !s.is_char_boundary(start) {
            start += 1;
        }
        s = format!("[... cut ...]\n{}", &s[start..]);
    }
    s
}

/// The report of `a` in `state`.
pub fn report_of(a: &TaskAssignment, state: TaskState, changed: bool, output: String) -> TaskReport {
    #[allow(unused_mut)]
    let mut r = TaskReport {
        task_id: a.task_id.clone(),
        attempt: a.attempt,
        state: state as i32,
        output,
        changed,
        ..Default::default()
    };
    #[cfg(feature = "skew-probe")]
    {
        r.skew_probe = "from-a-newer-agent".into();
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_keeps_its_tail_on_a_char_boundary() {
        let long = format!("{}é-end", "x".repeat(MAX_REPORT_OUTPUT));
        let b = bounded(long);
        assert!(b.starts_with("[... cut ...]") && b.ends_with("é-end"));
        assert!(b.len() <= MAX_REPORT_OUTPUT + 32);
        assert_eq!(bounded("short".into()), "short");
    }
}
