//! Progress on the terminal: finished steps as lines, the long steps of a move (the copy, the
//! catch-up) as indicatif bars with rows, rate and ETA. With `--json` nothing is printed; when
//! stderr is not a terminal the bars stay hidden and only the lines are written.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
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
        let (bar, template) = match total {
            Some(n) => (
                ProgressBar::with_draw_target(Some(n), ProgressDrawTarget::stderr()),
                "{prefix}{msg} [{bar:30}] {human_pos}/~{human_len} rows, {per_sec}, ETA {eta}",
            ),
            None => (
                ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()),
                "{prefix}{spinner} {msg}: {human_pos} ({per_sec})",
            ),
        };
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_prefix(self.prefix.clone());
        bar.set_message(step.to_string());
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
