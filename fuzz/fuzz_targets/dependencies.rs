//! Arbitrary `depends_on` edges among four workers and four jobs: a config
//! with a cycle never loads, and a cycle it names is one; a config that
//! loads starts every node after what it depends on, once, and stops in
//! the reverse order.
#![no_main]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use drover::config::{Overrides, load::load_text};
use drover::supervisor::graph::{Graph, Node};
use libfuzzer_sys::fuzz_target;

const CONDITIONS: [&str; 4] = ["started", "ready", "succeeded", "done"];

fn name(i: u8) -> String {
    if i < 4 { format!("w{i}") } else { format!("j{}", i - 4) }
}

/// Whether the edges (node → what it depends on) have a cycle.
fn has_cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> bool {
    fn visit(
        n: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        on_path: &mut BTreeSet<String>,
        done: &mut BTreeSet<String>,
    ) -> bool {
        if on_path.contains(n) {
            return true;
        }
        if !done.insert(n.to_string()) {
            return false;
        }
        on_path.insert(n.to_string());
        let cyclic = edges.get(n).into_iter().flatten().any(|d| visit(d, edges, on_path, done));
        on_path.remove(n);
        cyclic
    }
    let (mut on_path, mut done) = (BTreeSet::new(), BTreeSet::new());
    edges.keys().any(|n| visit(n, edges, &mut on_path, &mut done))
}

fn label(n: &Node) -> &str {
    match n {
        Node::Worker(s) | Node::Job(s) => s,
    }
}

fuzz_target!(|data: &[u8]| {
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut conds: BTreeMap<String, BTreeMap<String, &str>> = BTreeMap::new();
    for pair in data.chunks_exact(2).take(24) {
        let (from, to) = (name(pair[0] % 8), name(pair[1] % 8));
        conds.entry(from.clone()).or_default().insert(to.clone(), CONDITIONS[(pair[1] >> 3) as usize % 4]);
        edges.entry(from).or_default().insert(to);
    }
    let mut text = String::from("[supervisor]\nreload = false\n");
    for i in 0..8u8 {
        let n = name(i);
        let table = if i < 4 { "workers" } else { "jobs" };
        text.push_str(&format!("[{table}.{n}]\ncommand = [\"true\"]\n"));
        if i < 4 && i % 2 == 0 {
            text.push_str("ready = { tcp = \"127.0.0.1:1\" }\n");
        }
        if let Some(d) = conds.get(&n) {
            let list: Vec<String> = d.iter().map(|(k, c)| format!("{k} = \"{c}\"")).collect();
            text.push_str(&format!("depends_on = {{ {} }}\n", list.join(", ")));
        }
    }
    let path = Path::new("/nonexistent/fuzz/daemon.toml");
    let overrides = Overrides::new(std::iter::empty(), &[]).expect("no overrides");
    match load_text(path, text.clone(), &overrides) {
        Ok(loaded) => {
            assert!(!has_cycle(&edges), "a cycle loaded:\n{text}");
            let graph = Graph::of(&loaded.config);
            let start = graph.start_levels();
            let mut level_of = BTreeMap::new();
            for (l, nodes) in start.iter().enumerate() {
                for n in nodes {
                    assert!(level_of.insert(label(n).to_string(), l).is_none(), "{n:?} twice in {start:?}");
                }
            }
            assert_eq!(level_of.len(), 8, "{start:?}");
            for (from, to) in edges.iter().flat_map(|(f, ts)| ts.iter().map(move |t| (f, t))) {
                assert!(level_of[to] < level_of[from], "{from} starts before {to}: {start:?}");
            }
            let mut stop = graph.stop_levels();
            stop.reverse();
            assert_eq!(stop, start, "stop order is start order reversed");
        }
        Err(diags) => {
            for d in &diags {
                let msg = d.to_string();
                let Some(at) = msg.find("a cycle: ") else { continue };
                let path: Vec<&str> =
                    msg[at + 9..].lines().next().unwrap_or("").split(" -> ").map(str::trim).collect();
                assert!(path.len() >= 2 && path.first() == path.last(), "{msg}");
                for w in path.windows(2) {
                    assert!(edges.get(w[0]).is_some_and(|d| d.contains(w[1])), "{msg} names no cycle of\n{text}");
                }
            }
        }
    }
});
