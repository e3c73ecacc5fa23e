//! `blockdev-mirror` for disks attached with `-blockdev` (Proxmox VE 9, machine versions ≥
//! 10.0), as `PVE::QemuServer::BlockJob::blockdev_mirror` does it: the mirror target is a block
//! node of its own (`blockdev-add`), the job mirrors the device's top node (`drive-ID`, a
//! `throttle` filter) and `replaces` the node below it, and the target node is deleted again
//! (`blockdev-del`) when the job did not switch the disk over to it.
//!
//! The block graph is read from `query-named-block-nodes` (`flat`) and, for the edges between
//! nodes and who uses a node (another node, a device, a block job), from
//! `x-debug-query-block-graph` (QEMU ≥ 4.0); a QEMU without that command is read from the
//! `children` of `query-named-block-nodes` (QEMU ≥ 10.1, and Proxmox VE's 10.0) and the roots in
//! `query-block`.
//!
//! Target node names ([`target_node_names`]) follow from the job id alone, so that `finish` or
//! `cancel`, in another process, find the nodes to delete without being told.

use super::{MAX_ID, MirrorOptions, check_target};
use crate::error::{Error, Kind, Result};
use crate::io::{self, Deadline};
use crate::qmp::Qmp;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};

/// Longest node name QEMU accepts (its `id_wellformed` limit, 32 bytes with the NUL).
pub(crate) const MAX_NODE_NAME: usize = 31;

/// How a device is mirrored, decided from what the VM's QEMU has attached (never from a
/// version number).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// A BlockBackend of that name exists (`-drive`, `query-block` `device`): `drive-mirror`.
    DriveMirror,
    /// No such BlockBackend, but a block node of that name (`-blockdev`, the device's top node):
    /// `blockdev-mirror` into a target node of our own.
    BlockdevMirror,
}

impl Method {
    /// `"drive-mirror"` or `"blockdev-mirror"`, the QMP command's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::DriveMirror => "drive-mirror",
            Method::BlockdevMirror => "blockdev-mirror",
        }
    }
}

/// FNV-1a (32 bit): a fixed, dependency-free hash for shortened names.
fn fnv1a32(text: &str) -> u32 {
    text.bytes().fold(0x811c_9dc5, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// `prefix` + `job` if that fits [`MAX_NODE_NAME`]; otherwise `prefix`, as much of the job id as
/// fits before `-`, and 8 hex digits of the FNV-1a hash of the whole job id.
fn short_name(prefix: &str, job: &str) -> String {
    if prefix.len() + job.len() <= MAX_NODE_NAME {
        return format!("{prefix}{job}");
    }
    // job ids are ASCII (check_id), so any byte index is a char boundary
    let keep = MAX_NODE_NAME - prefix.len() - 9;
    format!("{prefix}{}-{:08x}", &job[..keep], fnv1a32(job))
}

/// The two names the target node of job `job` may have: `mt-JOB`, or `mt2-JOB` when `mt-JOB` is
/// in use (the disk itself after an earlier mirror with this job id was completed). Too long
/// for QEMU's 31 characters, the job id is cut and 8 hex digits of its FNV-1a hash appended:
/// `mt-` + 19 characters + `-` + hash (`mt2-` + 18 …). Job ids are `[A-Za-z0-9_.-]`, so the
/// names are valid node names, starting with a letter.
pub fn target_node_names(job: &str) -> [String; 2] {
    [short_name("mt-", job), short_name("mt2-", job)]
}

/// The job id `blockdev-mirror` gets by default: `mirror-ID` for the node `drive-ID`
/// (upstream's naming), `mirror-NODE` for any other node name.
pub fn default_job_id(node: &str) -> Result<String> {
    let id = node.strip_prefix("drive-").unwrap_or(node);
    let job = format!("mirror-{id}");
    if job.len() > MAX_ID {
        return Err(Error::invalid(format!(
            "the default job id '{job}' is longer than {MAX_ID} characters: give option 'job_id'"
        )));
    }
    Ok(job)
}

/// The `blockdev-add` arguments of the target node `node` for `target` (see
/// [`check_target`]): an NBD target is an `nbd` node (`server` `unix` with
/// `path`, or `inet` with `host`, without the brackets of an IPv6 address, and `port` as a
/// string, as QAPI wants), a path a `file` node (`host_device` for a block or character
/// device). A `format` other than `nbd` puts a node of that driver on top, with the protocol
/// node as its inline `file` child; a path needs one. The top node gets `detect-zeroes: on`
/// and `discard: ignore`, PVE's defaults.
pub fn target_arguments(node: &str, target: &str, format: Option<&str>) -> Result<Value> {
    check_target(target)?;
    let protocol = match target.strip_prefix("nbd:") {
        Some(rest) => {
            // check_target made sure both parts are there
            let (address, export) = rest.split_once(":exportname=").unwrap_or((rest, ""));
            let server = match address.strip_prefix("unix:") {
                Some(path) => json!({"type": "unix", "path": path}),
                None => {
                    let (host, port) = address.rsplit_once(':').unwrap_or((address, ""));
                    let host = host
                        .strip_prefix('[')
                        .and_then(|h| h.strip_suffix(']'))
                        .unwrap_or(host);
                    json!({"type": "inet", "host": host, "port": port})
                }
            };
            json!({"driver": "nbd", "server": server, "export": export})
        }
        None => {
            use std::os::unix::fs::FileTypeExt;
            let device = std::fs::metadata(target)
                .map(|m| m.file_type().is_block_device() || m.file_type().is_char_device())
                .unwrap_or(false);
            let driver = if device { "host_device" } else { "file" };
            json!({"driver": driver, "filename": target})
        }
    };
    let mut args = match (format, protocol["driver"] == "nbd") {
        (None, true) | (Some("nbd"), true) => protocol,
        (Some(format), _) => json!({"driver": format, "file": protocol}),
        (None, false) => {
            return Err(Error::invalid(format!(
                "option 'format' is required for mirror target '{}' (only nbd: targets default to nbd)",
                io::printable(target.as_bytes(), 200)
            )));
        }
    };
    args["node-name"] = json!(node);
    args["read-only"] = json!(false);
    // as qemu-server's add_common_options with PVE's defaults: zeroes the guest wrote cross
    // the tunnel as write-zeroes requests, not as data
    args["detect-zeroes"] = json!("on");
    args["discard"] = json!("ignore");
    Ok(args)
}

/// The `blockdev-mirror` arguments: job `job` mirrors the top node `device` into `target_node`,
/// replacing `replaces` (the node below a throttle top) when the job is completed.
pub fn mirror_arguments(
    job: &str,
    device: &str,
    target_node: &str,
    replaces: Option<&str>,
    opts: &MirrorOptions,
) -> Value {
    let mut args = json!({
        "job-id": job,
        "device": device,
        "target": target_node,
        "sync": opts.sync,
        "auto-dismiss": false,
    });
    if let Some(node) = replaces {
        args["replaces"] = json!(node);
    }
    if let Some(speed) = opts.speed {
        args["speed"] = json!(speed);
    }
    args
}

fn list<'a>(reply: &'a Value, command: &str) -> Result<&'a Vec<Value>> {
    reply
        .as_array()
        .ok_or_else(|| Error::new(Kind::Protocol, format!("{command} did not return a list")))
}

fn text<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

/// The BlockBackend names in `query-block` (`device`, empty for a `-blockdev` disk).
fn drives(qmp: &mut Qmp, deadline: Deadline) -> Result<(BTreeSet<String>, Vec<Value>)> {
    let reply = qmp.execute("query-block", None, deadline)?;
    let entries = list(&reply, "query-block")?.clone();
    let names = entries
        .iter()
        .map(|b| text(b, "device").to_string())
        .filter(|d| !d.is_empty())
        .collect();
    Ok((names, entries))
}

/// Every named block node (`query-named-block-nodes`, `flat`).
fn named_nodes(qmp: &mut Qmp, deadline: Deadline) -> Result<Vec<Value>> {
    let reply = qmp.execute(
        "query-named-block-nodes",
        Some(json!({"flat": true})),
        deadline,
    )?;
    Ok(list(&reply, "query-named-block-nodes")?.clone())
}

/// Which of drive-mirror and blockdev-mirror mirrors `device`: a BlockBackend of that name is
/// a drive, else a block node of that name a blockdev; neither is an error naming the device.
pub(crate) fn method(qmp: &mut Qmp, device: &str, deadline: Deadline) -> Result<Method> {
    if drives(qmp, deadline)?.0.contains(device) {
        return Ok(Method::DriveMirror);
    }
    if named_nodes(qmp, deadline)?
        .iter()
        .any(|n| text(n, "node-name") == device)
    {
        return Ok(Method::BlockdevMirror);
    }
    Err(Error::invalid(format!(
        "'{device}' is neither a drive (no device of that name in query-block) nor a block node (no node of that name in query-named-block-nodes)"
    )))
}

/// One edge of the block graph: `parent` uses `child` in role `role` (`file`, `backing`,
/// `root`, `target`…). A parent is a node name, `device NAME` or `job ID`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Edge {
    parent: String,
    role: String,
    child: String,
}

/// What the block graph looks like at one moment.
#[derive(Debug, Default)]
pub(crate) struct Graph {
    /// node name → driver
    drivers: BTreeMap<String, String>,
    edges: Vec<Edge>,
}

impl Graph {
    /// Reads the graph: the nodes, then the edges from `x-debug-query-block-graph`, or without
    /// that command from the nodes' `children` and `query-block`'s roots.
    pub(crate) fn read(qmp: &mut Qmp, deadline: Deadline) -> Result<Graph> {
        let nodes = named_nodes(qmp, deadline)?;
        Graph::with_edges(qmp, nodes, deadline)
    }

    fn with_edges(qmp: &mut Qmp, nodes: Vec<Value>, deadline: Deadline) -> Result<Graph> {
        let mut graph = Graph::default();
        for n in &nodes {
            graph
                .drivers
                .insert(text(n, "node-name").into(), text(n, "drv").into());
        }
        match qmp.execute("x-debug-query-block-graph", None, deadline) {
            Ok(reply) => graph.debug_edges(&reply)?,
            Err(e) if e.kind == Kind::Qmp => {
                for n in &nodes {
                    for c in n
                        .get("children")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                    {
                        graph.edges.push(Edge {
                            parent: text(n, "node-name").into(),
                            role: text(c, "child").into(),
                            child: text(c, "node-name").into(),
                        });
                    }
                }
                for b in drives(qmp, deadline)?.1 {
                    let root = b.get("inserted").map_or("", |i| text(i, "node-name"));
                    if !root.is_empty() {
                        let device = match text(&b, "device") {
                            "" => text(&b, "qdev"),
                            d => d,
                        };
                        graph.edges.push(Edge {
                            parent: format!("device {device}"),
                            role: "root".into(),
                            child: root.into(),
                        });
                    }
                }
            }
            Err(e) => return Err(e),
        }
        Ok(graph)
    }

    fn debug_edges(&mut self, reply: &Value) -> Result<()> {
        let bad = || {
            Error::new(
                Kind::Protocol,
                "x-debug-query-block-graph did not return nodes and edges",
            )
        };
        let mut names = BTreeMap::new();
        for n in reply
            .get("nodes")
            .and_then(Value::as_array)
            .ok_or_else(bad)?
        {
            let name = text(n, "name");
            let name = match text(n, "type") {
                "block-driver" => name.to_string(),
                "block-job" => format!("job {name}"),
                _ => format!("device {name}"),
            };
            names.insert(n.get("id").and_then(Value::as_u64).ok_or_else(bad)?, name);
        }
        for e in reply
            .get("edges")
            .and_then(Value::as_array)
            .ok_or_else(bad)?
        {
            let end = |key: &str| {
                e.get(key)
                    .and_then(Value::as_u64)
                    .and_then(|id| names.get(&id))
                    .cloned()
                    .ok_or_else(bad)
            };
            self.edges.push(Edge {
                parent: end("parent")?,
                role: text(e, "name").into(),
                child: end("child")?,
            });
        }
        Ok(())
    }

    /// Whether a node of that name exists.
    pub(crate) fn has(&self, node: &str) -> bool {
        self.drivers.contains_key(node)
    }

    fn driver(&self, node: &str) -> Option<&str> {
        self.drivers.get(node).map(String::as_str)
    }

    /// The child of `node` in role `role`.
    fn child(&self, node: &str, role: &str) -> Option<&str> {
        self.edges
            .iter()
            .find(|e| e.parent == node && e.role == role)
            .map(|e| e.child.as_str())
    }

    /// What uses `node`: parent nodes, devices, block jobs.
    fn users(&self, node: &str) -> Vec<&str> {
        self.edges
            .iter()
            .filter(|e| e.child == node)
            .map(|e| e.parent.as_str())
            .collect()
    }

    /// The node job `job` mirrors from (its `source` edge; only `x-debug-query-block-graph`
    /// shows jobs).
    fn job_source(&self, job: &str) -> Option<&str> {
        self.child(&format!("job {job}"), "source")
    }

    /// The node a job on top node `top` replaces: the `file` child of a `throttle` top (the
    /// node below the filter that limits the guest's I/O, which the mirror must not be slowed
    /// by), `None` for any other top, which is mirrored and replaced itself.
    fn below_throttle(&self, top: &str) -> Result<Option<String>> {
        if self.driver(top) != Some("throttle") {
            return Ok(None);
        }
        match self.child(top, "file") {
            Some(node) => Ok(Some(node.to_string())),
            None => Err(Error::new(
                Kind::Protocol,
                format!("'{top}' is a throttle node without a 'file' child node"),
            )),
        }
    }
}

/// Whether QEMU's error says the node does not exist (QEMU gives no class for it: its
/// `GenericError` text is matched, as upstream's `Blockdev::detach` does).
fn is_missing_node(e: &Error) -> bool {
    e.kind == Kind::Qmp && e.message.contains("Failed to find node with node-name")
}

/// Deletes `node` (`blockdev-del`) and then its `file` and `backing` children that are left (an
/// inline child goes with its parent; one added on its own does not), as upstream's
/// `Blockdev::detach` with `follow-backing`. A node that is already gone is fine. Returns the
/// nodes deleted.
pub(crate) fn detach(
    qmp: &mut Qmp,
    graph: &Graph,
    node: &str,
    deadline: Deadline,
) -> Result<Vec<String>> {
    let mut deleted = Vec::new();
    let mut queue = vec![node.to_string()];
    while let Some(name) = queue.pop() {
        if !graph.has(&name) {
            continue;
        }
        match qmp.execute("blockdev-del", Some(json!({"node-name": name})), deadline) {
            Ok(_) => deleted.push(name.clone()),
            Err(e) if is_missing_node(&e) => continue,
            Err(e) => return Err(e.context(format!("{name}: deleting the block node"))),
        }
        for role in ["backing", "file"] {
            if let Some(child) = graph.child(&name, role) {
                queue.push(child.to_string());
            }
        }
    }
    Ok(deleted)
}

/// What [`cleanup`] did: the nodes deleted, and why others could not be.
#[derive(Debug, Default)]
pub(crate) struct Cleanup {
    /// Node names deleted, in order.
    pub(crate) detached: Vec<String>,
    /// One error per node that could not be deleted (or a graph that could not be read).
    pub(crate) errors: Vec<Error>,
}

impl Cleanup {
    /// Adds `"detached"` (the node names deleted) and `"detach_errors"` (why a node could not
    /// be deleted) to the result object `result`, each only when it is not empty: the results
    /// of drive-mirror jobs stay as they always were.
    pub(crate) fn report(&self, result: &mut Value) {
        if !self.detached.is_empty() {
            result["detached"] = json!(self.detached);
        }
        if !self.errors.is_empty() {
            let errors: Vec<&str> = self.errors.iter().map(|e| e.message.as_str()).collect();
            result["detach_errors"] = json!(errors);
        }
    }
}

/// The nodes the `job-complete` of `jobs` will leave unused and which upstream detaches
/// afterwards: the node each blockdev-mirror job replaces (job → node). A job whose target node
/// does not exist is a drive-mirror job and has none. The job's top node comes from its
/// `source` edge, or, where the graph shows no jobs, from the default job id (`mirror-ID` →
/// `drive-ID`).
pub(crate) fn replaced_nodes(
    qmp: &mut Qmp,
    jobs: &[String],
    deadline: Deadline,
) -> Result<BTreeMap<String, String>> {
    let nodes = named_nodes(qmp, deadline)?;
    let has = |name: &String| nodes.iter().any(|n| text(n, "node-name") == name);
    let blockdev: Vec<&String> = jobs
        .iter()
        .filter(|job| target_node_names(job).iter().any(has))
        .collect();
    if blockdev.is_empty() {
        return Ok(BTreeMap::new());
    }
    let graph = Graph::with_edges(qmp, nodes, deadline)?;
    let mut replaced = BTreeMap::new();
    for job in blockdev {
        let top = match graph.job_source(job) {
            Some(top) => Some(top.to_string()),
            None => job
                .strip_prefix("mirror-")
                .map(|id| format!("drive-{id}"))
                .filter(|top| graph.has(top)),
        };
        let Some(top) = top else { continue };
        let node = graph.below_throttle(&top)?.unwrap_or(top);
        replaced.insert(job.clone(), node);
    }
    Ok(replaced)
}

/// After `jobs` are gone: deletes each job's target node that is left unused (a cancelled or
/// failed mirror; a completed one's target is the disk now and stays), and the nodes in
/// `replaced` that are unused (the old disk of a completed mirror). Costs one
/// `query-named-block-nodes` when there is nothing to delete (drive-mirror jobs).
pub(crate) fn cleanup(
    qmp: &mut Qmp,
    jobs: &[String],
    replaced: &BTreeMap<String, String>,
    deadline: Deadline,
) -> Cleanup {
    let mut done = Cleanup::default();
    let mut candidates: Vec<String> = Vec::new();
    for job in jobs {
        candidates.extend(replaced.get(job).cloned());
        candidates.extend(target_node_names(job));
    }
    let nodes = match named_nodes(qmp, deadline) {
        Ok(nodes) => nodes,
        Err(e) => {
            done.errors
                .push(e.context("reading the block nodes to delete the mirror targets"));
            return done;
        }
    };
    candidates.retain(|c| nodes.iter().any(|n| text(n, "node-name") == c));
    if candidates.is_empty() {
        return done;
    }
    let graph = match Graph::with_edges(qmp, nodes, deadline) {
        Ok(graph) => graph,
        Err(e) => {
            done.errors
                .push(e.context("reading the block graph to delete the mirror targets"));
            return done;
        }
    };
    for node in candidates {
        if done.detached.contains(&node) || !graph.users(&node).is_empty() {
            continue;
        }
        match detach(qmp, &graph, &node, deadline) {
            Ok(deleted) => done.detached.extend(deleted),
            Err(e) => done.errors.push(e),
        }
    }
    done
}

/// Starts `blockdev-mirror` of the top node `device` into `target` on `qmp`: checks the job id
/// is free, picks the target node's name (deleting an unused leftover of that name), adds the
/// target node and starts the job; if the job cannot start, the target node is deleted again.
/// Returns the job id.
pub(crate) fn start(
    qmp: &mut Qmp,
    device: &str,
    target: &str,
    opts: &MirrorOptions,
    deadline: Deadline,
) -> Result<String> {
    if opts.mode != "existing" {
        return Err(Error::invalid(format!(
            "option 'mode' must be 'existing' for '{device}': it is a -blockdev node, mirrored with blockdev-mirror into a target that exists"
        )));
    }
    let job = match &opts.job_id {
        Some(job) => job.clone(),
        None => default_job_id(device)?,
    };
    // the arguments are checked before anything is sent
    target_arguments("mt-x", target, opts.format.as_deref())?;

    let jobs = qmp.execute("query-block-jobs", None, deadline)?;
    if list(&jobs, "query-block-jobs")?
        .iter()
        .any(|j| text(j, "device") == job)
    {
        return Err(Error::new(
            Kind::Qmp,
            format!("a block job '{job}' exists already (a mirror of this disk is running?)"),
        ));
    }
    let graph = Graph::read(qmp, deadline)?;
    let replaces = graph.below_throttle(device)?;
    let mut chosen = None;
    for name in target_node_names(&job) {
        if !graph.has(&name) {
            chosen = Some(name);
            break;
        }
        let users = graph.users(&name);
        if users.is_empty() {
            // a leftover of an earlier mirror that was not cleaned up
            detach(qmp, &graph, &name, deadline)
                .map_err(|e| e.context("deleting a leftover target node"))?;
            chosen = Some(name);
            break;
        }
    }
    let node = chosen.ok_or_else(|| {
        let [a, b] = target_node_names(&job);
        Error::new(
            Kind::Qmp,
            format!(
                "the target node names of job '{job}' ({a}, {b}) are both in use: give another 'job_id'"
            ),
        )
    })?;
    let args = target_arguments(&node, target, opts.format.as_deref())?;
    qmp.execute("blockdev-add", Some(args), deadline)
        .map_err(|e| e.context(format!("adding the target node '{node}'")))?;
    let args = mirror_arguments(&job, device, &node, replaces.as_deref(), opts);
    if let Err(e) = qmp.execute("blockdev-mirror", Some(args), deadline) {
        let mut e = e;
        match qmp.execute("blockdev-del", Some(json!({"node-name": node})), deadline) {
            Ok(_) => {}
            Err(d) if is_missing_node(&d) => {}
            Err(d) => {
                e.message.push_str(&format!(
                    "; deleting the target node '{node}' failed too: {d}"
                ));
            }
        }
        return Err(e);
    }
    Ok(job)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_node_names_fit_qemus_limit_and_start_with_a_letter() {
        assert_eq!(
            target_node_names("mirror-ide0"),
            ["mt-mirror-ide0".to_string(), "mt2-mirror-ide0".to_string()]
        );
        let long = "j".repeat(64);
        let [a, b] = target_node_names(&long);
        assert_eq!(a.len(), MAX_NODE_NAME, "{a}");
        assert_eq!(b.len(), MAX_NODE_NAME, "{b}");
        assert!(a.starts_with("mt-jjjjjjjjjjjjjjjjjjj-"), "{a}");
        assert!(b.starts_with("mt2-jjjjjjjjjjjjjjjjjj-"), "{b}");
        let other = format!("{}k", "j".repeat(63));
        assert_ne!(
            target_node_names(&other)[0],
            a,
            "the hash tells long ids apart"
        );
        assert_eq!(target_node_names(&long)[0], a, "the name is deterministic");
        let fits = "m".repeat(MAX_NODE_NAME - 3);
        assert_eq!(target_node_names(&fits)[0], format!("mt-{fits}"));
    }

    #[test]
    fn default_job_ids_follow_upstream() {
        assert_eq!(default_job_id("drive-scsi0").unwrap(), "mirror-scsi0");
        assert_eq!(default_job_id("disk1").unwrap(), "mirror-disk1");
        let e = default_job_id(&"n".repeat(60)).unwrap_err();
        assert_eq!(e.kind, Kind::InvalidArgument);
        assert!(e.message.ends_with("give option 'job_id'"), "{}", e.message);
    }
}
