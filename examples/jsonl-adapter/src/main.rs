//! `concord-jsonl-adapter --config FILE`: the JSON-lines system's adapter as a process.

fn main() -> std::process::ExitCode {
    concord_adapter::main::<concord_jsonl_adapter::JsonlSystem>()
}
