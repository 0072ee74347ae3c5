//! Long commands' progress: one line redrawn in place on a terminal (a
//! pseudo-terminal made by util-linux `script`), and a line every 5 s
//! without one. `make bench-progress` reports how good the time left is.

use std::process::Command;

use crate::batch::{Folder, batch_with};
use crate::helpers::{run, seed_csv_path, stderr, txnflow};
use crate::scenario::Scenario;

/// `txnflow ARGS` in a pseudo-terminal of 200 columns: what the terminal showed.
fn on_a_terminal(scenario: &Scenario, args: &[&str]) -> String {
    let program = txnflow().get_program().to_string_lossy().into_owned();
    let command = std::iter::once(program)
        .chain(args.iter().map(|arg| arg.to_string()))
        .map(|word| format!("'{word}'"))
        .collect::<Vec<_>>()
        .join(" ");
    let output = run(Command::new("script")
        .args(["--quiet", "--return", "--command", &format!("stty cols 200 rows 50; exec {command}"), "/dev/null"])
        .env("TXNFLOW__KAFKA__BROKERS", crate::helpers::brokers())
        .env("TXNFLOW__KAFKA__TOPIC", &scenario.topic)
        .env("TXNFLOW__KAFKA__DLQ_TOPIC", &scenario.dlq_topic)
        .env("TXNFLOW__DB__URL", &scenario.db.url)
        .env("TXNFLOW__PREDICT__URL", scenario.ml_api_url())
        .env("TXNFLOW__REPREDICT__URL", scenario.ml_api_url()));
    let shown = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "txnflow {args:?} failed on a terminal:\n{shown}");
    shown
}

/// The screen a terminal shows after `raw`: carriage returns, new lines,
/// cursor moves up and down, line clears; colours and other codes ignored.
fn screen(raw: &str) -> Vec<String> {
    let mut lines: Vec<Vec<char>> = vec![Vec::new()];
    let (mut row, mut column) = (0usize, 0usize);
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => column = 0,
            '\n' => row += 1,
            '\x1b' if chars.peek() == Some(&'[') => {
                chars.next();
                let mut argument = String::new();
                let mut command = ' ';
                for next in chars.by_ref() {
                    if next.is_ascii_alphabetic() {
                        command = next;
                        break;
                    }
                    argument.push(next);
                }
                let n: usize = argument.parse().unwrap_or(1);
                match (command, argument.as_str()) {
                    ('A', _) => row = row.saturating_sub(n),
                    ('B', _) => row += n,
                    ('K', "2") => lines[row].clear(),
                    _ => {}
                }
            }
            c => {
                let line = &mut lines[row];
                if line.len() <= column {
                    line.resize(column + 1, ' ');
                }
                line[column] = c;
                column += 1;
            }
        }
        while lines.len() <= row {
            lines.push(Vec::new());
        }
    }
    lines.iter().map(|line| line.iter().collect::<String>().trim_end().to_string()).collect()
}

#[tokio::test]
async fn a_batch_run_and_a_repredict_redraw_one_progress_line_on_a_terminal_up_to_100_percent() {
    let scenario = Scenario::new("progresstty").await;
    let folder = Folder::new().await;
    let uri = folder.put("transactions_fr.csv", std::fs::read(seed_csv_path()).unwrap()).await;
    // 20 ms an ML API call: the run lasts long enough to draw a few frames.
    scenario.set_faults(serde_json::json!({"latency_ms": 20})).await;
    let shown = on_a_terminal(&scenario, &["batch", &uri, "--run-id", "tty-run"]);

    // Drawn more than once, and left on the screen as one line at 100%.
    let frames = shown.matches("batch run tty-run [").count();
    assert!(frames >= 2, "redrawn at least once ({frames} frames):\n{shown:?}");
    let screen = screen(&shown);
    let bars: Vec<&String> = screen.iter().filter(|line| line.contains("batch run tty-run [")).collect();
    assert_eq!(bars.len(), 1, "one line on the screen, redrawn in place:\n{}", screen.join("\n"));
    let size = std::fs::metadata(seed_csv_path()).unwrap().len();
    let total = indicatif::BinaryBytes(size).to_string();
    assert!(bars[0].contains(&format!("] 100% {total}/{total} ")), "the bar ends at 100%: {:?}", bars[0]);
    assert!(
        bars[0].contains("file 1/1: read 10000 valid 10000 invalid 0 predicted 10000 written 10000"),
        "{:?}",
        bars[0]
    );
    // The log's lines and the summary are whole lines of their own.
    let logged = |line: &&String| line.contains("batch run completed summary=") && line.ends_with(" s\"");
    assert!(screen.iter().any(|line| logged(&line)), "{}", screen.join("\n"));
    let summary = screen.iter().rev().find(|line| !line.is_empty()).expect("a summary line");
    assert!(
        summary.starts_with(
            "read 10000 valid 10000 invalid 0 predicted 10000 written 10000 already-stored 0 dead-lettered 0 in "
        ),
        "{summary:?}"
    );
    assert_eq!(scenario.count("SELECT count(*) FROM transactions WHERE run_id = 'tty-run'"), 10_000);

    // A re-prediction of those rows, by rows re-predicted out of those selected.
    let shown = on_a_terminal(&scenario, &["repredict", "--run-id", "tty-re"]);
    let screen = self::screen(&shown);
    let bars: Vec<&String> = screen.iter().filter(|line| line.contains("re-prediction tty-re [")).collect();
    assert_eq!(bars.len(), 1, "one line on the screen:\n{}", screen.join("\n"));
    assert!(bars[0].contains("] 100% 10,000/10,000 "), "the bar ends at 100%: {:?}", bars[0]);
    assert!(bars[0].ends_with(" left repredicted 10000 failed 0"), "{:?}", bars[0]);
    let summary = screen.iter().rev().find(|line| !line.is_empty()).expect("a summary line");
    assert!(summary.starts_with("run tty-re completed: selected 10000 repredicted 10000 failed 0 "), "{summary:?}");
}

#[tokio::test]
async fn without_a_terminal_a_batch_run_says_its_progress_every_5_seconds() {
    let scenario = Scenario::new("progresslines").await;
    let folder = Folder::new().await;
    let uri = folder.put("transactions_fr.csv", std::fs::read(seed_csv_path()).unwrap()).await;
    // 100 calls of 100 rows at 300 ms, 4 at a time: about 8 s.
    scenario.set_faults(serde_json::json!({"latency_ms": 300})).await;
    let output = batch_with(
        &scenario,
        &[&uri, "--run-id", "lines-run"],
        &[("TXNFLOW__BUFFER__MAX_RECORDS", "100"), ("TXNFLOW__PREDICT__BATCH_SIZE", "100")],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let log = stderr(&output);
    assert!(!log.contains('\r'), "no redrawing without a terminal:\n{log}");
    let said_by = "txnflow::observability::progress: batch run lines-run: ";
    let lines: Vec<&str> = log.lines().filter(|line| line.contains(said_by)).collect();
    assert!(!lines.is_empty(), "a progress line after 5 s:\n{log}");
    for line in &lines {
        let said = &line[line.find(said_by).unwrap() + said_by.len()..];
        let (percent, rest) = said.split_once("%, ").unwrap_or_else(|| panic!("a percent first: {line}"));
        let percent: f64 = percent.parse().unwrap_or_else(|_| panic!("a number: {line}"));
        assert!(percent > 0.0 && percent < 100.0, "{line}");
        assert!(rest.starts_with("about ") && rest.contains(" left, "), "the time left: {line}");
        assert!(rest.contains("/s: file 1/1: read "), "the rate, then the counts: {line}");
    }
    assert_eq!(scenario.count("SELECT count(*) FROM transactions WHERE run_id = 'lines-run'"), 10_000);
}
