//! User mistakes get one clear line naming what is wrong, and a non-zero exit; never a panic.

use crate::WEIR;
use weir_tests::{Weir, plugin};

fn run_with_plugin(weir: &Weir, plugin: &str) -> weir_tests::Finished {
    weir.write_lines("in.jsonl", [r#"{"id":"a"}"#]);
    weir.run([
        "run",
        "--plugin",
        plugin,
        "--input",
        "in.jsonl",
        "--output",
        "out.jsonl",
        "--state",
        "state",
    ])
}

#[test]
fn unknown_config_field_is_named() {
    let weir = Weir::new(WEIR);
    std::fs::write(weir.path("weir.toml"), "[limits]\ndeadline = 5\n").expect("write");
    weir.run(["run", "--config", "weir.toml"])
        .fails_with(&["weir.toml", "unknown field `deadline`"]);
}

#[test]
fn invalid_config_value_names_the_field() {
    let weir = Weir::new(WEIR);
    let enrich = plugin("enrich");
    std::fs::write(
        weir.path("weir.toml"),
        format!(
            "[plugin]\npath = {:?}\n[source]\npath = \"in.jsonl\"\n[sink]\npath = \"out.jsonl\"\n[pipeline]\nbatch_size = 0\n",
            enrich.to_str().expect("utf-8")
        ),
    )
    .expect("write");
    let with_config = |extra: &[&str]| {
        let mut args = vec!["run", "--config", "weir.toml"];
        args.extend(extra);
        weir.run(args)
    };
    with_config(&[]).fails_with(&["pipeline.batch_size", "between 1 and 65536"]);
    with_config(&["--batch-size", "10", "--id", "id"]).fails_with(&["pipeline.id", "JSON pointer"]);
    with_config(&["--batch-size", "10", "--plugin-config", "novalue"])
        .fails_with(&["--plugin-config", "KEY=VALUE"]);
    with_config(&["--batch-size", "10", "--api", "0.0.0.0:8080"]).fails_with(&[
        "api.addr",
        "not a loopback address",
        "allow_non_loopback",
    ]);
    let mut text = std::fs::read_to_string(weir.path("weir.toml")).expect("read");
    text = text.replace("batch_size = 0", "batch_size = 10") + "[canary]\nmargin = 5\n";
    std::fs::write(weir.path("weir.toml"), text).expect("write");
    with_config(&[]).fails_with(&["canary.margin", "from 0 to 1"]);
}

#[test]
fn the_admin_token_is_never_printed() {
    let weir = Weir::new(WEIR);
    let enrich = plugin("enrich");
    std::fs::write(
        weir.path("weir.toml"),
        format!(
            "[plugin]\npath = {:?}\n[source]\npath = \"in.jsonl\"\n[sink]\npath = \"out.jsonl\"\n[api]\naddr = \"127.0.0.1:8080\"\nadmin_token = \"hunter2-token\"\n",
            enrich.to_str().expect("utf-8")
        ),
    )
    .expect("write");
    let checked = weir.run(["run", "--config", "weir.toml", "--check"]);
    assert!(checked.output.status.success(), "{}", checked.stderr());
    let printed = checked.stdout() + &checked.stderr();
    assert!(printed.contains("[api]"), "{printed}");
    assert!(!printed.contains("hunter2"), "{printed}");
}

#[test]
fn missing_required_settings_are_named() {
    let weir = Weir::new(WEIR);
    weir.run(["run", "--input", "in.jsonl", "--output", "out.jsonl"])
        .fails_with(&["plugin.path", "--plugin"]);
}

#[test]
fn missing_plugin_names_the_path() {
    let weir = Weir::new(WEIR);
    run_with_plugin(&weir, "no/such/plugin.wasm")
        .fails_with(&["no/such/plugin.wasm", "No such file"]);
}

#[test]
fn missing_input_names_the_path() {
    let weir = Weir::new(WEIR);
    let enrich = plugin("enrich");
    let failed = weir
        .run([
            "run",
            "--plugin",
            enrich.to_str().expect("utf-8"),
            "--input",
            "nope.jsonl",
            "--output",
            "o.jsonl",
        ])
        .fails_with(&["nope.jsonl", "No such file"]);
    let stderr = failed.stderr();
    assert_eq!(
        stderr.matches("No such file").count(),
        1,
        "the cause is said once:\n{stderr}"
    );
}

#[test]
fn a_file_that_is_not_wasm_is_refused() {
    let weir = Weir::new(WEIR);
    std::fs::write(weir.path("text.wasm"), "hello").expect("write");
    run_with_plugin(&weir, "text.wasm").fails_with(&["text.wasm", "not a WebAssembly file"]);
}

#[test]
fn a_core_module_is_refused_with_the_fix() {
    let weir = Weir::new(WEIR);
    std::fs::write(
        weir.path("core.wasm"),
        wat::parse_str("(module (func (export \"f\")))").expect("wat"),
    )
    .expect("write");
    run_with_plugin(&weir, "core.wasm").fails_with(&[
        "core.wasm",
        "core WebAssembly module, not a component",
        "wasm32-wasip2",
    ]);
}

#[test]
fn a_component_of_neither_world_is_refused() {
    let weir = Weir::new(WEIR);
    let component = wat::parse_str("(component (core module $m) (core instance (instantiate $m)))")
        .expect("wat");
    std::fs::write(weir.path("empty.wasm"), component).expect("write");
    run_with_plugin(&weir, "empty.wasm").fails_with(&[
        "empty.wasm",
        "exports nothing named `transform-batch`",
        "`transform`",
    ]);
}

#[test]
fn a_component_of_another_contract_version_is_refused() {
    let weir = Weir::new(WEIR);
    let component = wat::parse_str(
        r#"(component
            (component $c (core module $m (func (export "f"))) (core instance $i (instantiate $m))
                (func $f (canon lift (core func $i "f"))) (export "transform-batch" (func $f)))
            (instance $inst (instantiate $c))
            (export "weir:transform/batch-transform@0.2.0" (instance $inst)))"#,
    )
    .expect("wat");
    std::fs::write(weir.path("v2.wasm"), component).expect("write");
    run_with_plugin(&weir, "v2.wasm").fails_with(&[
        "exports `weir:transform/batch-transform@0.2.0`",
        "this host supports weir:transform@0.1.0",
    ]);
}

#[test]
fn init_refusing_the_config_is_reported() {
    let weir = Weir::new(WEIR);
    let filter = plugin("filter");
    run_with_plugin(&weir, filter.to_str().expect("utf-8"))
        .fails_with(&["init refused the configuration", "`field` is required"]);
}

#[test]
fn a_stateful_plugin_where_state_cannot_be_kept_is_refused_before_connecting() {
    let weir = Weir::new(WEIR);
    let metrics = plugin("metrics").display().to_string();
    let cluster = [
        "run",
        "--plugin",
        &metrics,
        "--kafka",
        "127.0.0.1:1",
        "--group",
        "g",
        "--input-topic",
        "in",
        "--output-topic",
        "out",
        "--dlq-topic",
        "dlq",
        "--redis",
        "redis://127.0.0.1:1",
    ];
    // Nothing listens on these ports: each refusal comes before any connection, and says why.
    let refusals: [(&[&str], &str); 2] = [
        (&["--redis-cluster"], "use one Redis server"),
        (&["--retry-topic", "parked"], "leave retry.topic unset"),
    ];
    for (extra, why) in refusals {
        weir.run(cluster.iter().chain(extra))
            .fails_with(&["plugin `metrics` keeps keyed state", why]);
    }
}
