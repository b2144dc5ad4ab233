//! A kube-runtime `Controller` with the `finalizer` helper and SSA status
//! writes, run against the double end to end.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{ar, vmlease, vmleases, within};
use futures::StreamExt;
use keyway_apiserver_double::ApiServer;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams, ResourceExt};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::{Controller, watcher};
use serde_json::json;
use tokio::sync::mpsc;

const FINALIZER: &str = "keyway.dev/test-cleanup";

#[derive(Debug)]
struct ReconcileError(String);

impl std::fmt::Display for ReconcileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ReconcileError {}

struct Ctx {
    api: Api<DynamicObject>,
    cleaned: mpsc::UnboundedSender<String>,
}

async fn reconcile(obj: Arc<DynamicObject>, ctx: Arc<Ctx>) -> Result<Action, ReconcileError> {
    let api = ctx.api.clone();
    finalizer(&api, FINALIZER, obj, |ev| async {
        match ev {
            Finalizer::Apply(o) => {
                let status = json!({
                    "apiVersion": "keyway.dev/v1alpha1",
                    "kind": "VMLease",
                    "status": {"phase": "Ready", "observedGeneration": o.metadata.generation},
                });
                api.patch_status(
                    &o.name_any(),
                    &PatchParams::apply("keyway-test-controller").force(),
                    &Patch::Apply(&status),
                )
                .await
                .map_err(|e| ReconcileError(e.to_string()))?;
                Ok::<_, ReconcileError>(Action::requeue(Duration::from_secs(300)))
            }
            Finalizer::Cleanup(o) => {
                let _ = ctx.cleaned.send(o.name_any());
                Ok(Action::await_change())
            }
        }
    })
    .await
    .map_err(|e| ReconcileError(e.to_string()))
}

fn error_policy(_: Arc<DynamicObject>, _: &ReconcileError, _: Arc<Ctx>) -> Action {
    Action::requeue(Duration::from_millis(100))
}

#[tokio::test]
async fn controller_with_finalizer_and_status() {
    let server = ApiServer::start().await.unwrap();
    let client = server.client().unwrap();
    let api = vmleases(&client, "ns");
    let (tx, mut cleaned) = mpsc::unbounded_channel();
    let ctx = Arc::new(Ctx {
        api: api.clone(),
        cleaned: tx,
    });
    let controller = Controller::new_with(
        api.clone(),
        watcher::Config::default(),
        ar("VMLease", "vmleases"),
    )
    .run(reconcile, error_policy, ctx)
    .for_each(|_| async {});
    let handle = tokio::spawn(controller);

    api.create(&PostParams::default(), &vmlease("c1", json!({"user": "u"})))
        .await
        .unwrap();

    // Wait (via a watch, not polling sleeps) until the controller has set the
    // finalizer and the status.
    let mut w = watcher(api.clone(), watcher::Config::default()).boxed();
    within("finalizer + Ready status", async {
        loop {
            let ev = w.next().await.unwrap().unwrap();
            let o = match ev {
                watcher::Event::Apply(o) | watcher::Event::InitApply(o) => o,
                _ => continue,
            };
            if o.finalizers().iter().any(|f| f == FINALIZER) && o.data["status"]["phase"] == "Ready"
            {
                assert_eq!(o.data["status"]["observedGeneration"], 1);
                break;
            }
        }
    })
    .await;

    api.delete("c1", &DeleteParams::default()).await.unwrap();
    let name = within("cleanup", cleaned.recv()).await.unwrap();
    assert_eq!(name, "c1");
    within("object gone", async {
        loop {
            if let watcher::Event::Delete(o) = w.next().await.unwrap().unwrap() {
                assert_eq!(o.name_any(), "c1");
                break;
            }
        }
    })
    .await;
    assert!(
        server
            .object("keyway.dev", "vmleases", Some("ns"), "c1")
            .is_none()
    );
    let finalizer_patches = server
        .requests()
        .iter()
        .filter(|r| {
            r.method == "PATCH" && r.content_type.as_deref() == Some("application/json-patch+json")
        })
        .count();
    assert_eq!(finalizer_patches, 2, "add + remove finalizer");
    handle.abort();
}
