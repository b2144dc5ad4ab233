//! Building and encoding the routing snapshot for 100,000 leases.
//! `cargo bench -p keyway-operator --bench snapshot`
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::time::Instant;

use keyway_core::allocator::LeaseKey;
use keyway_core::world::{LeaseObject, PoolObject, Settings, World};
use keyway_crds::addresses::AddressSet;
use keyway_crds::keys::AccessKey;
use keyway_crds::validate::{HostPort, Target, ValidLease};
use prost::Message;
use ssh_key::public::Ed25519PublicKey;

const LEASES: usize = 100_000;
const USERS: usize = 10_000;

fn key(i: usize) -> AccessKey {
    let mut raw = [0u8; 32];
    raw[..8].copy_from_slice(&(i as u64).to_le_bytes());
    AccessKey::from_key(ssh_key::PublicKey::from(Ed25519PublicKey(raw))).unwrap()
}

fn main() {
    let user_keys: Vec<AccessKey> = (0..USERS).map(key).collect();
    let pool = PoolObject {
        name: "pool".into(),
        generation: Some(1),
        spec: Ok(AddressSet::new(&["198.51.100.0/24".to_string()], &[]).unwrap()),
    };
    let leases: Vec<LeaseObject> = (0..LEASES)
        .map(|i| LeaseObject {
            key: LeaseKey {
                namespace: format!("ns{}", i % 100),
                name: format!("vm-{i}"),
            },
            uid: format!("uid-{i}"),
            created_ms: i as u64,
            generation: Some(1),
            spec: Ok(ValidLease {
                user: format!("user{}", i % USERS),
                pool: "pool".into(),
                keys: vec![user_keys[i % USERS].clone()],
                target: Target::Address(HostPort {
                    host: format!("10.{}.{}.{}", i >> 16 & 255, i >> 8 & 255, i & 255),
                    port: 22,
                }),
                upstream_user: None,
                settled: false,
            }),
            status_ip: None,
        })
        .collect();
    let settings = Settings {
        public_ssh_port: 22,
        relay_ca_public_key:
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKKoNs9XCkg70lxMPr+Kwva+cmXzf8/12/Srx2GyMdae"
                .into(),
        relay_cert_validity_secs: 300,
    };
    let t = Instant::now();
    let mut world = World::restore(settings, vec![pool], leases.clone(), vec![]);
    let restore = t.elapsed();

    let t = Instant::now();
    world.take_dirty();
    let snap = world.snapshot(0);
    let build = t.elapsed();
    assert_eq!(snap.leases.len(), LEASES);

    let t = Instant::now();
    let bytes = snap.encode_to_vec();
    let encode = t.elapsed();

    let t = Instant::now();
    keyway_snapshot::check::check(&snap).unwrap();
    let check = t.elapsed();

    let publisher = keyway_snapshot::server::Publisher::new(1);
    let t = Instant::now();
    publisher.publish(snap.clone()).unwrap();
    let publish = t.elapsed();
    let t = Instant::now();
    publisher.publish(snap).unwrap();
    let republish = t.elapsed();

    // One-lease edits the way the front doors publish them: the world
    // re-derives the dirty objects, the publisher checks only the change.
    const EDITS: usize = 1000;
    let t = Instant::now();
    let mut wire = 0;
    for i in 0..EDITS {
        let mut edited = leases[i * 37 % LEASES].clone();
        if let Ok(spec) = &mut edited.spec {
            spec.keys = vec![user_keys[(i + 1) % USERS].clone()];
        }
        world.apply_lease(edited);
        let dirty = world.take_dirty();
        let change = world.snapshot_delta(&dirty, 0);
        let prepared = publisher.prepare_delta(&change).unwrap();
        wire += prepared.change().map_or(0, |c| c.encoded_len());
        publisher.commit(prepared).unwrap();
    }
    let per_edit = t.elapsed() / EDITS as u32;

    let ms = |d: std::time::Duration| format!("{:.1} ms", d.as_secs_f64() * 1e3);
    let table = format!(
        "| what ({LEASES} leases, {USERS} users, /24 pool) | figure | target |\n|---|---|---|\n\
         | world restore incl. allocation | {} | — |\n\
         | build snapshot (derive + assemble) | {} | — |\n\
         | protobuf encode ({:.1} MiB) | {} | — |\n\
         | **build + encode** | **{}** | < 500 ms |\n\
         | consistency check | {} | — |\n\
         | publish (check + encode + compare) | {} | — |\n\
         | publish unchanged content (no new version) | {} | — |\n\
         | one-lease edit: re-derive dirty + check and version the delta (mean of {EDITS}) | {:.3} ms | — |\n\
         | delta bytes per one-lease edit (mean) | {} B | < 4 KiB |\n",
        ms(restore),
        ms(build),
        bytes.len() as f64 / (1024.0 * 1024.0),
        ms(encode),
        ms(build + encode),
        ms(check),
        ms(publish),
        ms(republish),
        per_edit.as_secs_f64() * 1e3,
        wire / EDITS,
    );
    print!("{table}");
    if let Some(path) = std::env::var_os("KEYWAY_BENCH_OUT") {
        let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
        f.write_all(table.as_bytes()).unwrap();
    }
}
