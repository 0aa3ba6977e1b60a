//! `scaled-bench` run in-process through `scaled_bench::run`, the same function its binary calls, so
//! the exit status and the JSON are exactly what a user of the binary would get.

use serde_json::Value;

/// Runs `scaled-bench ARGS --json` and returns its exit status and its JSON report.
pub fn bench(args: &[&str]) -> (u8, Value) {
    let mut out = Vec::new();
    let argv = std::iter::once("scaled-bench")
        .chain(args.iter().copied())
        .chain(["--json"]);
    let status = scaled_bench::run(argv, &mut out);
    let text = String::from_utf8(out).expect("the report is UTF-8");
    let json = serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("scaled-bench {args:?} printed no JSON ({e}): {text:?}"));
    (status, json)
}

/// The report's unsigned member `name`, failing the test when it has none.
pub fn count(report: &Value, name: &str) -> u64 {
    report[name]
        .as_u64()
        .unwrap_or_else(|| panic!("report without {name}: {report}"))
}
