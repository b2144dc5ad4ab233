//! Where `keyway ssh` and `keyway config` find leases: a local-mode directory
//! (its state database) or the cluster (VMLease status through the API).

use std::path::Path;

use anyhow::{Context, Result, bail};

/// What the CLI needs of a lease.
#[derive(Clone, Debug)]
pub struct Lease {
    pub namespace: String,
    pub name: String,
    pub user: String,
    pub ip: Option<String>,
    pub phase: String,
}

/// Leases of a local-mode directory.
pub fn local(dir: &Path) -> Result<Vec<Lease>> {
    let paths = keyway_state::Paths::new(dir);
    let Some(state) = keyway_state::read(&paths)? else {
        bail!(
            "{} has no state yet; is `keyway-operator run --local {}` running?",
            dir.display(),
            dir.display()
        );
    };
    Ok(keyway_state::rows(&state)
        .into_iter()
        .map(|r| Lease {
            namespace: r.namespace,
            name: r.name,
            user: r.user,
            ip: r.ip,
            phase: r.phase,
        })
        .collect())
}

/// VMLeases in the cluster ($KUBECONFIG or in-cluster), in `namespace` or all.
pub async fn cluster(namespace: Option<&str>) -> Result<Vec<Lease>> {
    use keyway_crds::VMLease;
    use kube::api::{Api, ListParams};
    let client = kube::Client::try_default()
        .await
        .context("connecting to Kubernetes (KUBECONFIG or in-cluster); or use --local DIR")?;
    let api: Api<VMLease> = match namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    let list = api
        .list(&ListParams::default())
        .await
        .context("listing VMLeases")?;
    Ok(list
        .items
        .into_iter()
        .map(|l| {
            let st = l.status.clone().unwrap_or_default();
            Lease {
                namespace: l.metadata.namespace.clone().unwrap_or_default(),
                name: l.metadata.name.clone().unwrap_or_default(),
                user: l.spec.user.clone(),
                ip: st.ip,
                phase: st
                    .phase
                    .map(|p| format!("{p:?}"))
                    .unwrap_or_else(|| "Pending".into()),
            }
        })
        .collect())
}

/// Finds `name` or `name.namespace` among `leases`.
pub fn find<'a>(leases: &'a [Lease], wanted: &str) -> Result<&'a Lease> {
    let (name, ns) = match wanted.split_once('.') {
        Some((n, ns)) => (n, Some(ns)),
        None => (wanted, None),
    };
    let hits: Vec<&Lease> = leases
        .iter()
        .filter(|l| l.name == name && ns.is_none_or(|ns| l.namespace == ns))
        .collect();
    match hits.as_slice() {
        [one] => Ok(one),
        [] => bail!("no lease {wanted:?}"),
        many => bail!(
            "{wanted:?} is ambiguous: {}; say NAME.NAMESPACE",
            many.iter()
                .map(|l| format!("{}.{}", l.name, l.namespace))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// ssh_config Host blocks, one per lease with an IP (`user` filters).
pub fn config(leases: &[Lease], user: Option<&str>, port: u16, identity: Option<&Path>) -> String {
    let mut out = String::from("# Written by `keyway config`: one Host per VMLease.\n");
    for l in leases.iter().filter(|l| user.is_none_or(|u| l.user == u)) {
        let Some(ip) = &l.ip else {
            out.push_str(&format!(
                "# {}.{}: no address yet ({})\n",
                l.name, l.namespace, l.phase
            ));
            continue;
        };
        out.push_str(&format!(
            "Host {}.{}.keyway\n  HostName {ip}\n  Port {port}\n",
            l.name, l.namespace
        ));
        if let Some(i) = identity {
            out.push_str(&format!(
                "  IdentityFile {}\n  IdentitiesOnly yes\n",
                i.display()
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn l(ns: &str, name: &str, user: &str, ip: Option<&str>) -> Lease {
        Lease {
            namespace: ns.into(),
            name: name.into(),
            user: user.into(),
            ip: ip.map(str::to_string),
            phase: if ip.is_some() { "Ready" } else { "Pending" }.into(),
        }
    }

    #[test]
    fn find_and_config() {
        let ls = vec![
            l("a", "web", "alice", Some("10.0.0.1")),
            l("b", "web", "bob", Some("10.0.0.2")),
            l("a", "db", "alice", None),
        ];
        assert!(find(&ls, "web").is_err(), "ambiguous");
        assert_eq!(find(&ls, "web.b").unwrap().user, "bob");
        assert!(find(&ls, "nope").is_err());
        let c = config(&ls, Some("alice"), 22, Some(Path::new("/k")));
        assert!(c.contains("Host web.a.keyway\n  HostName 10.0.0.1\n  Port 22\n  IdentityFile /k"));
        assert!(c.contains("# db.a: no address yet (Pending)"));
        assert!(!c.contains("10.0.0.2"));
    }
}
