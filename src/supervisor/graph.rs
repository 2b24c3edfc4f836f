//! The dependency graph of a config's workers and jobs (`depends_on`), as
//! pure decisions: start and stop order in levels (each level may run in
//! parallel), what a node still waits for, the jobs a start must run, and
//! the order to stop what a reload removes. The config has no cycles (a
//! config error); should one slip through, its nodes come last, never lost.

use std::collections::{BTreeMap, BTreeSet};

use crate::config::Config;
use crate::config::model::Condition;

/// A worker or a job, by name (the two tables are separate namespaces).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Node {
    Worker(String),
    Job(String),
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Graph {
    /// Every node, with what it depends on and for what.
    deps: BTreeMap<Node, BTreeMap<Node, Condition>>,
}

impl Graph {
    /// The graph of `config`: a name in `depends_on` is a worker if one has
    /// that name, else a job (the config refuses names that are both).
    pub fn of(config: &Config) -> Graph {
        let node = |n: &String| {
            if config.workers.contains_key(n) { Node::Worker(n.clone()) } else { Node::Job(n.clone()) }
        };
        let deps_of = |d: &BTreeMap<String, Condition>| {
            d.iter().map(|(n, c)| (node(n), *c)).collect::<BTreeMap<_, _>>()
        };
        let mut deps = BTreeMap::new();
        for (n, w) in &config.workers {
            deps.insert(Node::Worker(n.clone()), deps_of(&w.depends_on));
        }
        for (n, j) in &config.jobs {
            deps.insert(Node::Job(n.clone()), deps_of(&j.depends_on));
        }
        Graph::from_edges(deps)
    }

    /// A graph from each node's dependencies; a dependency that is not a
    /// node itself is added as one with none.
    pub fn from_edges(mut deps: BTreeMap<Node, BTreeMap<Node, Condition>>) -> Graph {
        let named: Vec<Node> = deps.values().flat_map(|d| d.keys().cloned()).collect();
        for n in named {
            deps.entry(n).or_default();
        }
        Graph { deps }
    }

    /// Start order: each level depends only on earlier levels.
    pub fn start_levels(&self) -> Vec<Vec<Node>> {
        levels(self.deps.keys(), |n| self.deps.get(n).into_iter().flat_map(|d| d.keys()).collect())
    }

    /// Stop order: a dependent stops before what it depends on.
    pub fn stop_levels(&self) -> Vec<Vec<Node>> {
        let mut l = self.start_levels();
        l.reverse();
        l
    }

    /// The dependencies of `node` whose condition is not met yet, with that
    /// condition (`met` says whether a node has reached a condition).
    pub fn blocked_by(&self, node: &Node, met: impl Fn(&Node, Condition) -> bool) -> Vec<(Node, Condition)> {
        self.deps
            .get(node)
            .into_iter()
            .flatten()
            .filter(|(d, c)| !met(d, **c))
            .map(|(d, c)| (d.clone(), *c))
            .collect()
    }

    /// The jobs that must run when drover starts: those a worker depends
    /// on, and the jobs those depend on in turn.
    pub fn jobs_to_run_at_start(&self) -> BTreeSet<String> {
        let mut todo: Vec<&Node> = self
            .deps
            .iter()
            .filter(|(n, _)| matches!(n, Node::Worker(_)))
            .flat_map(|(_, d)| d.keys())
            .filter(|d| matches!(d, Node::Job(_)))
            .collect();
        let mut out = BTreeSet::new();
        while let Some(n) = todo.pop() {
            if let Node::Job(name) = n
                && out.insert(name.clone())
            {
                todo.extend(
                    self.deps.get(n).into_iter().flat_map(|d| d.keys()).filter(|d| matches!(d, Node::Job(_))),
                );
            }
        }
        out
    }

    /// The order to stop `removed` (nodes of this, the old, graph) on a
    /// reload: a removed dependent before the removed node it depends on,
    /// through removed or kept nodes alike.
    pub fn removal_levels(&self, removed: &BTreeSet<Node>) -> Vec<Vec<Node>> {
        self.stop_levels()
            .into_iter()
            .map(|l| l.into_iter().filter(|n| removed.contains(n)).collect::<Vec<_>>())
            .filter(|l| !l.is_empty())
            .collect()
    }
}

/// Kahn's layering of `nodes`: a node goes in the level after the last of
/// its dependencies. Nodes left on a cycle form one last level.
fn levels<'a>(
    nodes: impl Iterator<Item = &'a Node>,
    deps: impl Fn(&Node) -> Vec<&'a Node>,
) -> Vec<Vec<Node>> {
    let mut left: BTreeSet<&Node> = nodes.collect();
    let mut done: BTreeSet<&Node> = BTreeSet::new();
    let mut out = Vec::new();
    while !left.is_empty() {
        // Every dependency is a node (`from_edges` sees to it).
        let level: Vec<&Node> =
            left.iter().copied().filter(|n| deps(n).iter().all(|d| done.contains(d))).collect();
        let level = if level.is_empty() { left.iter().copied().collect() } else { level };
        for n in &level {
            left.remove(n);
        }
        done.extend(level.iter().copied());
        out.push(level.into_iter().cloned().collect());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn w(n: &str) -> Node {
        Node::Worker(n.into())
    }
    fn j(n: &str) -> Node {
        Node::Job(n.into())
    }

    fn graph(edges: &[(Node, &[(Node, Condition)])]) -> Graph {
        Graph::from_edges(edges.iter().map(|(n, d)| (n.clone(), d.iter().cloned().collect())).collect())
    }

    fn example() -> Graph {
        // api needs db ready and migrate succeeded; migrate needs db started;
        // web needs api; cleanup (a job) needs seed (a job), which needs nothing.
        graph(&[
            (w("api"), &[(w("db"), Condition::Ready), (j("migrate"), Condition::Succeeded)]),
            (j("migrate"), &[(w("db"), Condition::Started)]),
            (w("web"), &[(w("api"), Condition::Ready)]),
            (w("db"), &[]),
            (j("report"), &[(j("migrate"), Condition::Succeeded)]),
        ])
    }

    #[test]
    fn start_levels_follow_dependencies_and_stop_is_the_reverse() {
        let g = example();
        assert_eq!(
            g.start_levels(),
            vec![vec![w("db")], vec![j("migrate")], vec![w("api"), j("report")], vec![w("web")]]
        );
        assert_eq!(
            g.stop_levels(),
            vec![vec![w("web")], vec![w("api"), j("report")], vec![j("migrate")], vec![w("db")]]
        );
    }

    #[test]
    fn blocked_by_lists_the_unmet_conditions() {
        let g = example();
        let db_ready = |n: &Node, c: Condition| n == &w("db") && c != Condition::Succeeded;
        assert_eq!(g.blocked_by(&w("api"), db_ready), vec![(j("migrate"), Condition::Succeeded)]);
        assert_eq!(g.blocked_by(&w("api"), |_, _| true), vec![]);
        assert_eq!(g.blocked_by(&w("db"), |_, _| false), vec![]);
        assert_eq!(g.blocked_by(&w("nope"), |_, _| false), vec![]);
    }

    #[test]
    fn jobs_a_worker_depends_on_run_at_start_with_theirs() {
        let g = graph(&[
            (w("api"), &[(j("migrate"), Condition::Succeeded)]),
            (j("migrate"), &[(j("schema"), Condition::Succeeded), (w("db"), Condition::Ready)]),
            (j("report"), &[(j("other"), Condition::Succeeded)]),
        ]);
        assert_eq!(g.jobs_to_run_at_start(), ["migrate".to_string(), "schema".to_string()].into());
    }

    #[test]
    fn removed_dependents_stop_before_removed_dependencies() {
        let g = example();
        let removed: BTreeSet<Node> = [w("web"), w("db"), j("migrate")].into();
        assert_eq!(g.removal_levels(&removed), vec![vec![w("web")], vec![j("migrate")], vec![w("db")]]);
    }

    #[test]
    fn a_cycle_that_slipped_through_is_last_not_lost() {
        let g = graph(&[
            (w("a"), &[(w("b"), Condition::Ready)]),
            (w("b"), &[(w("a"), Condition::Ready)]),
            (w("c"), &[]),
        ]);
        assert_eq!(g.start_levels(), vec![vec![w("c")], vec![w("a"), w("b")]]);
    }

    /// A random acyclic graph: node i may depend only on nodes below i.
    fn dag() -> impl Strategy<Value = Graph> {
        (1usize..12).prop_flat_map(|n| {
            proptest::collection::vec(proptest::collection::btree_set(0usize..12, 0..4), n).prop_map(
                move |deps| {
                    let node = |i: usize| if i % 3 == 0 { j(&format!("n{i}")) } else { w(&format!("n{i}")) };
                    Graph::from_edges(
                        deps.into_iter()
                            .enumerate()
                            .map(|(i, d)| {
                                let d = d
                                    .into_iter()
                                    .filter(|k| *k < i)
                                    .map(|k| (node(k), Condition::Started))
                                    .collect();
                                (node(i), d)
                            })
                            .collect(),
                    )
                },
            )
        })
    }

    proptest! {
        #[test]
        fn levels_put_every_node_once_after_its_dependencies(g in dag()) {
            let levels = g.start_levels();
            let at: BTreeMap<&Node, usize> =
                levels.iter().enumerate().flat_map(|(i, l)| l.iter().map(move |n| (n, i))).collect();
            prop_assert_eq!(at.len(), g.deps.len());
            prop_assert_eq!(levels.iter().map(Vec::len).sum::<usize>(), g.deps.len());
            for (n, deps) in &g.deps {
                for d in deps.keys() {
                    prop_assert!(at[d] < at[n], "{:?} at {} but its dependency {:?} at {}", n, at[n], d, at[d]);
                }
            }
            let mut stop = g.stop_levels();
            stop.reverse();
            prop_assert_eq!(stop, levels);
        }

        #[test]
        fn removal_stops_dependents_first(g in dag(), mask in proptest::collection::vec(any::<bool>(), 12)) {
            let removed: BTreeSet<Node> =
                g.deps.keys().zip(mask).filter(|(_, m)| *m).map(|(n, _)| n.clone()).collect();
            let order = g.removal_levels(&removed);
            let at: BTreeMap<&Node, usize> =
                order.iter().enumerate().flat_map(|(i, l)| l.iter().map(move |n| (n, i))).collect();
            prop_assert_eq!(at.len(), removed.len());
            for (n, deps) in &g.deps {
                for d in deps.keys() {
                    if let (Some(a), Some(b)) = (at.get(n), at.get(d)) {
                        prop_assert!(a < b);
                    }
                }
            }
        }
    }
}
