//! Progress on the terminal: finished steps as lines, the long steps of a move (the copy, the
//! catch-up) as indicatif bars with rows, rate and ETA. With `--json` nothing is printed; when
//! stderr is not a terminal the bars stay hidden and only the lines are written.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};
use pgshard::rebalance::Progress;
use std::sync::Mutex;

/// A move's progress reporter.
pub struct Bars {
    /// Put before every line (e.g. "[2/5] " in a rebalance).
    prefix: String,
    quiet: bool,
    bar: Mutex<Option<ProgressBar>>,
}

impl Bars {
    pub fn new(prefix: impl Into<String>, quiet: bool) -> Bars {
        Bars {
            prefix: prefix.into(),
            quiet,
            bar: Mutex::new(None),
        }
    }

    fn start(&self, step: &str, total: Option<u64>) -> ProgressBar {
        let template = match total {
            Some(_) => "{prefix}{msg} [{bar:30}] {human_pos}/~{human_len} rows, {rate}, ETA {left}",
            None => "{prefix}{spinner} {msg}: {human_pos} ({rate})",
        };
        // Styled while hidden, so the first frame drawn is already the right one.
        let bar = ProgressBar::hidden();
        if let Some(n) = total {
            bar.set_length(n);
        }
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(
                style
                    .progress_chars("=> ")
                    // Averages over the whole step: a copy's rows arrive in bursts, which throw
                    // indicatif's smoothed rate (and its ETA) far off.
                    .with_key("rate", |s: &ProgressState, w: &mut dyn std::fmt::Write| {
                        let _ = write!(w, "{:.0}/s", average_rate(s));
                    })
                    .with_key("left", |s: &ProgressState, w: &mut dyn std::fmt::Write| {
                        let rate = average_rate(s);
                        let left = s.len().unwrap_or(0).saturating_sub(s.pos()) as f64;
                        match rate > 0.0 {
                            true => {
                                let left = std::time::Duration::from_secs_f64(left / rate);
                                let _ = write!(w, "{}", indicatif::HumanDuration(left));
                            }
                            false => {
                                let _ = write!(w, "?");
                            }
                        }
                    }),
            );
        }
        bar.set_prefix(self.prefix.clone());
        bar.set_message(step.to_string());
        bar.set_draw_target(ProgressDrawTarget::stderr());
        bar
    }
}

impl Progress for Bars {
    fn line(&self, msg: &str) {
        if self.quiet {
            return;
        }
        let line = format!("{}{msg}", self.prefix);
        match self.bar.lock().expect("bar lock").as_ref() {
            Some(b) if !b.is_hidden() => b.println(line),
            _ => eprintln!("{line}"),
        }
    }

    fn advance(&self, step: &str, done: u64, total: Option<u64>) {
        if self.quiet {
            return;
        }
        let mut slot = self.bar.lock().expect("bar lock");
        let bar = slot.get_or_insert_with(|| self.start(step, total));
        // The length is the planner's estimate: grow it rather than overflow the bar.
        if bar.length().is_some_and(|n| done > n) {
            bar.set_length(done);
        }
        bar.set_position(done);
    }

    fn step_done(&self) {
        if let Some(b) = self.bar.lock().expect("bar lock").take() {
            b.finish_and_clear();
        }
    }
}

/// Steps per second since the step began.
fn average_rate(s: &ProgressState) -> f64 {
    let secs = s.elapsed().as_secs_f64();
    if secs > 0.0 {
        s.pos() as f64 / secs
    } else {
        0.0
    }
}
