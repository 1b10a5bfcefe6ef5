//! Hosts of our own on this machine: one network namespace per host, each
//! joined to a bridge in the root namespace by a veth pair, with addresses
//! in 10.213.N.0/24 (N free on this machine when made). The root namespace
//! reaches every host through the bridge's address (`.254`). A host is cut
//! off either by setting the root end of its veth pair down (its own end
//! loses its carrier) or by disabling its bridge port (both ends stay up:
//! a switch silently dropping its traffic); either way its packets, both
//! ways, are dropped without a word. Everything is
//! removed on drop (also while unwinding), and what a killed test process
//! left behind is removed by the next [`Net::new`].
//!
//! Needs root and iproute2 (`ip`, `bridge`). Names start with `tsp<pid>x<k>` (links
//! must fit in 15 bytes).
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

const PREFIX: &str = "tsp";

/// One host: a namespace, its address, the root end of its link.
pub struct Host {
    pub name: String,
    /// The network namespace.
    pub ns: String,
    /// Its address on the bridge.
    pub addr: String,
    /// The veth end in the root namespace, on the bridge.
    link: String,
}

/// A bridge and its hosts, removed on drop.
pub struct Net {
    bridge: String,
    hosts: Vec<Host>,
    /// The bridge's address: the root namespace's on this network.
    pub gateway: String,
}

/// `ip ARGS`, its stderr in the error.
pub fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("run ip {}: {e} (is iproute2 installed?)", args.join(" ")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "ip {}: {}: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A network of hosts for `test`, or `None` after printing `SKIPPED <test>:
/// <why>` when namespaces cannot be made here. Panics instead when `CI` is
/// set (non-empty): CI runs as root, where they can.
pub fn net_or_skip(test: &str, hosts: &[&str]) -> Option<Net> {
    match Net::new(hosts) {
        Ok(net) => Some(net),
        Err(why) => {
            if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
                panic!(
                    "{test}: needs network namespaces (root and iproute2) and CI is set, \
                     so it may not be skipped: {why}"
                );
            }
            eprintln!(
                "SKIPPED {test}: cannot make network namespaces: {why} (this test checked nothing)"
            );
            None
        }
    }
}

impl Net {
    /// Makes one namespace per name in `hosts`, all on one new bridge.
    pub fn new(hosts: &[&str]) -> Result<Net, String> {
        assert!(hosts.len() <= 9, "at most 9 hosts");
        sweep_stale();
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let k = COUNTER.fetch_add(1, Ordering::Relaxed) % 10;
        let base = format!("{PREFIX}{}x{k}", std::process::id());
        let subnet = free_subnet(k)?;
        let mut net = Net {
            bridge: format!("{base}b"),
            hosts: Vec::new(),
            gateway: format!("10.213.{subnet}.254"),
        };
        // From here on, dropping `net` removes whatever was made.
        ip(&["link", "add", &net.bridge, "type", "bridge"])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", net.gateway),
            "dev",
            &net.bridge,
        ])?;
        ip(&["link", "set", &net.bridge, "up"])?;
        for (i, name) in hosts.iter().enumerate() {
            let host = Host {
                name: name.to_string(),
                ns: format!("{base}-{name}"),
                addr: format!("10.213.{subnet}.{}", i + 1),
                link: format!("{base}h{i}"),
            };
            ip(&["netns", "add", &host.ns])?;
            net.hosts.push(host);
            let host = net.hosts.last().expect("just pushed");
            ip(&[
                "link", "add", &host.link, "type", "veth", "peer", "name", "eth0", "netns",
                &host.ns,
            ])?;
            ip(&["link", "set", &host.link, "master", &net.bridge, "up"])?;
            let addr = format!("{}/24", host.addr);
            ip(&["-n", &host.ns, "addr", "add", &addr, "dev", "eth0"])?;
            ip(&["-n", &host.ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &host.ns, "link", "set", "lo", "up"])?;
        }
        Ok(net)
    }

    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name}"))
    }

    /// `ip netns exec NS`: the prefix that runs a command on host `name`.
    pub fn on(&self, name: &str) -> [String; 4] {
        ["ip", "netns", "exec", &self.host(name).ns].map(String::from)
    }

    /// Cuts host `name` off by setting the root end of its link down: its
    /// own end loses its carrier (a pulled cable), and everything it sends
    /// or is sent is dropped.
    pub fn cut(&self, name: &str) {
        ip(&["link", "set", &self.host(name).link, "down"]).expect("cut");
    }

    /// Cuts host `name` off silently: the bridge stops forwarding to and
    /// from its port (a switch dropping its traffic), and both ends of its
    /// link stay up.
    pub fn drop_traffic(&self, name: &str) {
        bridge_port_state(&self.host(name).link, "0").expect("disable the bridge port");
    }

    /// Joins host `name` again, however it was cut.
    pub fn heal(&self, name: &str) {
        let link = &self.host(name).link;
        ip(&["link", "set", link, "up"]).expect("heal");
        // A port whose link was down accepts a state only once the link is
        // up (ENETDOWN until then), which the kernel reports a moment later.
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Err(e) = bridge_port_state(link, "3") {
            assert!(Instant::now() < deadline, "forward on the bridge port: {e}");
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for host in &self.hosts {
            let _ = ip(&["netns", "del", &host.ns]);
            // Gone with the namespace, unless a process still lives in it.
            let _ = ip(&["link", "del", &host.link]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

/// `bridge link set dev LINK state STATE` (0 disabled, 3 forwarding).
fn bridge_port_state(link: &str, state: &str) -> Result<(), String> {
    let out = Command::new("bridge")
        .args(["link", "set", "dev", link, "state", state])
        .output()
        .map_err(|e| format!("run bridge: {e} (is iproute2 installed?)"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "bridge link set dev {link} state {state}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A third octet N such that no address of this machine is in 10.213.N.0/24.
/// `k` tells apart the networks of one process (made in parallel).
fn free_subnet(k: u32) -> Result<u8, String> {
    let used = ip(&["-4", "-o", "addr", "show"])?;
    let start = (std::process::id() + 25 * k) % 250;
    (0..250)
        .map(|i| ((start + i) % 250 + 1) as u8)
        .find(|n| !used.contains(&format!(" 10.213.{n}.")))
        .ok_or_else(|| "no free subnet in 10.213.0.0/16".to_string())
}

/// The test process id in one of our names, if it is one.
fn owner(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?.split('x').next()?.parse().ok()
}

fn dead(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes the namespaces and links of test processes that are gone.
fn sweep_stale() {
    if let Ok(list) = ip(&["netns", "list"]) {
        for ns in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if owner(ns).is_some_and(dead) {
                let _ = ip(&["netns", "del", ns]);
            }
        }
    }
    if let Ok(list) = ip(&["-o", "link", "show"]) {
        // "7: NAME@PEER: <...": the name is the second field, up to '@' or ':'.
        for line in list.lines() {
            let Some(field) = line.split_whitespace().nth(1) else {
                continue;
            };
            let name = field.split(['@', ':']).next().unwrap_or("");
            if owner(name).is_some_and(dead) {
                let _ = ip(&["link", "del", name]);
            }
        }
    }
}
