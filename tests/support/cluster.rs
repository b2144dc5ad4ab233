//! Cluster mode under test: the in-process API server double, the real
//! `keyway-operator` binary pointed at it through a kubeconfig, and helpers
//! to read what the operator wrote.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};
use keyway_apiserver_double::ApiServer;
use kube::api::{Api, DynamicObject, PostParams};
use serde_json::{Value, json};

use crate::stack::free_port;
use crate::{Proc, bin, new_public_key};

/// The operator's namespace in every test.
pub const NS: &str = "keyway-system";
/// The Secret holding the snapshot token.
pub const TOKEN_SECRET: &str = "keyway-snapshot-token";

/// A double plus what an operator needs to start.
pub struct ClusterEnv {
    /// The API server double.
    pub api: ApiServer,
    /// A client for the test itself (user "test").
    pub client: kube::Client,
    /// Scratch space (kubeconfigs, keys, logs).
    pub dir: tempfile::TempDir,
    /// The relay CA private key file.
    pub relay_ca: PathBuf,
    /// The snapshot token stored in the Secret.
    pub token: String,
}

/// A running operator replica.
pub struct OperatorProc {
    /// The process (killed on drop).
    pub proc: Proc,
    /// Its identity, which is also the bearer token it sends (so the double's
    /// request log says which replica made each request).
    pub identity: String,
    /// Snapshot gRPC address.
    pub grpc: SocketAddr,
    /// Metrics address.
    pub metrics: SocketAddr,
}

impl OperatorProc {
    /// `http://grpc`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// `GET /readyz` answers 200 (this replica leads and has restored).
    pub fn ready(&self) -> bool {
        http_get(self.metrics, "/readyz").is_some_and(|(code, _)| code == 200)
    }

    /// The `/metrics` text.
    pub fn metrics_text(&self) -> Option<String> {
        http_get(self.metrics, "/metrics").map(|(_, body)| body)
    }
}

/// `GET path` on a plain-HTTP port: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    crate::stack::http_get(addr, path).ok()
}

impl ClusterEnv {
    /// Starts the double and stores the token Secret.
    pub async fn start() -> Result<Self> {
        Self::start_with(keyway_apiserver_double::Options::default()).await
    }

    /// [`ClusterEnv::start`] with the double's options (a scale bench keeps
    /// more watch history, as etcd keeps minutes of it).
    pub async fn start_with(opts: keyway_apiserver_double::Options) -> Result<Self> {
        let api = ApiServer::start_with(opts).await?;
        let dir = tempfile::tempdir()?;
        let kubeconfig = dir.path().join("kubeconfig-test");
        api.write_kubeconfig(&kubeconfig, "test")?;
        let client = api.client()?;
        new_public_key(dir.path(), "relay-ca");
        let relay_ca = dir.path().join("relay-ca");
        let token = format!("tok-{}", std::process::id());
        let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), NS);
        let secret = k8s_openapi::api::core::v1::Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(TOKEN_SECRET.into()),
                namespace: Some(NS.into()),
                ..Default::default()
            },
            data: Some(BTreeMap::from([(
                "token".to_string(),
                k8s_openapi::ByteString(token.clone().into_bytes()),
            )])),
            ..Default::default()
        };
        secrets.create(&PostParams::default(), &secret).await?;
        Ok(ClusterEnv {
            api,
            client,
            dir,
            relay_ca,
            token,
        })
    }

    /// Starts an operator replica named `identity` with short leader-election
    /// timings (lease 4 s) so failover tests run quickly.
    pub fn operator(&self, identity: &str, extra: &[&str]) -> Result<OperatorProc> {
        let kubeconfig = self.dir.path().join(format!("kubeconfig-{identity}"));
        self.api.write_kubeconfig(&kubeconfig, identity)?;
        let grpc: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let mut cmd = Command::new(bin("keyway-operator"));
        cmd.env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", "info,keyway_operator=debug,kube=warn")
            .env_remove("POD_NAME")
            .env_remove("POD_NAMESPACE")
            .arg("run")
            .arg("--relay-ca-key")
            .arg(&self.relay_ca)
            .args(["--token-secret", TOKEN_SECRET, "--namespace", NS])
            .args(["--identity", identity])
            .args(["--grpc-listen", &grpc.to_string()])
            .args(["--metrics-listen", &metrics.to_string()])
            .args(["--public-ssh-port", "2222"])
            .args([
                "--lease-duration-secs",
                "4",
                "--renew-deadline-secs",
                "3",
                "--retry-period-secs",
                "0.5",
            ])
            .args(extra);
        let log = self.dir.path().join(format!("operator-{identity}.log"));
        let proc = Proc::spawn_append(cmd, &log)?;
        Ok(OperatorProc {
            proc,
            identity: identity.to_string(),
            grpc,
            metrics,
        })
    }

    /// `keyway-proxy run` subscribed to `endpoint` with the snapshot token,
    /// the relay CA and its state files under the env's directory, SSH on
    /// `ssh_listen`, metrics on `metrics`; callers add flags and spawn it.
    pub fn proxy_command(&self, endpoint: &str, ssh_listen: &str, metrics: SocketAddr) -> Command {
        let dir = self.dir.path();
        let token_file = dir.join("proxy-token");
        std::fs::write(&token_file, &self.token)
            .unwrap_or_else(|e| panic!("writing the token: {e}"));
        let mut cmd = Command::new(bin("keyway-proxy"));
        cmd.arg("run")
            .args(["--endpoint", endpoint, "--node-id", "proxy-1"])
            .arg("--token-file")
            .arg(&token_file)
            .args(["--ssh-listen", ssh_listen])
            .args(["--metrics-listen", &metrics.to_string()])
            .arg("--relay-ca-key")
            .arg(&self.relay_ca)
            .arg("--host-key")
            .arg(dir.join("proxy-host-key"))
            .arg("--cache")
            .arg(dir.join("proxy-snapshot.pb"));
        cmd
    }

    /// Every VMLease as stored.
    pub fn leases(&self) -> Vec<Value> {
        self.api.objects("keyway.dev", "vmleases")
    }

    /// One lease as stored.
    pub fn lease(&self, ns: &str, name: &str) -> Option<Value> {
        self.api.object("keyway.dev", "vmleases", Some(ns), name)
    }

    /// One pool as stored.
    pub fn pool(&self, name: &str) -> Option<Value> {
        self.api.object("keyway.dev", "ippools", None, name)
    }

    /// `namespace/name → ip` of every lease whose phase is Ready.
    pub fn ready_ips(&self) -> BTreeMap<String, String> {
        self.leases()
            .iter()
            .filter(|l| l["status"]["phase"] == "Ready")
            .filter_map(|l| {
                Some((
                    format!(
                        "{}/{}",
                        l["metadata"]["namespace"].as_str()?,
                        l["metadata"]["name"].as_str()?
                    ),
                    l["status"]["ip"].as_str()?.to_string(),
                ))
            })
            .collect()
    }

    /// The holder of the leader Lease.
    pub fn leader(&self) -> Option<String> {
        self.api
            .object("coordination.k8s.io", "leases", Some(NS), "keyway-operator")?
            ["spec"]["holderIdentity"]
            .as_str()
            .map(str::to_string)
    }

    /// events.k8s.io Events as stored.
    pub fn events(&self) -> Vec<Value> {
        self.api.objects("events.k8s.io", "events")
    }

    /// Dynamic API for a keyway kind (`ippools`, `vmleases`, `sshroutes`).
    pub fn dynamic(&self, plural: &str, ns: Option<&str>) -> Api<DynamicObject> {
        let kind = match plural {
            "ippools" => "IPPool",
            "vmleases" => "VMLease",
            _ => "SshRoute",
        };
        let ar = kube::api::ApiResource {
            group: "keyway.dev".into(),
            version: "v1alpha1".into(),
            api_version: "keyway.dev/v1alpha1".into(),
            kind: kind.into(),
            plural: plural.into(),
        };
        match ns {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, &ar),
            None => Api::all_with(self.client.clone(), &ar),
        }
    }

    /// Creates an object from JSON.
    pub async fn create(&self, plural: &str, obj: Value) -> Result<()> {
        let ns = obj["metadata"]["namespace"].as_str().map(str::to_string);
        let o: DynamicObject = serde_json::from_value(obj)?;
        self.dynamic(plural, ns.as_deref())
            .create(&PostParams::default(), &o)
            .await
            .with_context(|| format!("creating {plural}"))?;
        Ok(())
    }
}

/// An IPPool object.
pub fn pool_obj(name: &str, addresses: &[&str]) -> Value {
    json!({
        "apiVersion": "keyway.dev/v1alpha1", "kind": "IPPool",
        "metadata": {"name": name},
        "spec": {"addresses": addresses},
    })
}

/// A VMLease object with a direct target.
pub fn lease_obj(ns: &str, name: &str, user: &str, pool: &str, key: &str) -> Value {
    json!({
        "apiVersion": "keyway.dev/v1alpha1", "kind": "VMLease",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "user": user, "poolRef": pool, "accessPublicKeys": [key],
            "target": {"address": "127.0.0.1:22"},
        },
    })
}

/// A fixed valid bare ed25519 key (64 hex), different per `n`.
pub fn hex_key(n: u32) -> String {
    format!("{:064x}", u128::from(n) + 1)
}

impl Drop for ClusterEnv {
    /// A failing test shows the tail of every process log it started.
    fn drop(&mut self) {
        if std::env::var_os("KEYWAY_KEEP_TEST_DIR").is_some()
            && let Ok(fresh) = tempfile::tempdir()
        {
            let kept = std::mem::replace(&mut self.dir, fresh).keep();
            eprintln!("kept {}", kept.display());
            return;
        }
        if !std::thread::panicking() {
            return;
        }
        let Ok(entries) = std::fs::read_dir(self.dir.path()) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "log") {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(60)..].join("\n");
                eprintln!("----- {} (last 60 lines) -----\n{tail}", p.display());
            }
        }
    }
}
