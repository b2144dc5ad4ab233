//! Kubeconfig rendering for processes (the operator binary) that connect to the double.

use serde_json::json;

/// Name used for the cluster, user and context entries.
pub const CONTEXT_NAME: &str = "keyway-apiserver-double";

/// Renders a kubeconfig YAML pointing at `server` with a bearer `token`.
///
/// The context's default namespace is `default`.
pub fn render(server: &str, token: &str) -> anyhow::Result<String> {
    let user = format!("{CONTEXT_NAME}-user");
    let doc = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "preferences": {},
        "clusters": [{"name": CONTEXT_NAME, "cluster": {"server": server}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{
            "name": CONTEXT_NAME,
            "context": {"cluster": CONTEXT_NAME, "user": user, "namespace": "default"},
        }],
        "current-context": CONTEXT_NAME,
    });
    Ok(serde_norway::to_string(&doc)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_yaml() -> anyhow::Result<()> {
        let y = render("http://127.0.0.1:1", "t: ok")?;
        let v: serde_json::Value = serde_norway::from_str(&y)?;
        assert_eq!(v["users"][0]["user"]["token"], "t: ok");
        assert_eq!(v["clusters"][0]["cluster"]["server"], "http://127.0.0.1:1");
        assert_eq!(v["current-context"], CONTEXT_NAME);
        Ok(())
    }
}
