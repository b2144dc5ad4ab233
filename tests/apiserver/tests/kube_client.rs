//! The double driven by a real `kube::Client`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{ar, ippools, raw, vmlease, vmleases, within};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use keyway_apiserver_double::{ApiServer, Options};
use kube::api::{
    Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams, ResourceExt,
    WatchEvent, WatchParams,
};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Client, Resource};
use serde_json::json;

fn api_err(e: kube::Error) -> Box<kube::core::Status> {
    match e {
        kube::Error::Api(s) => s,
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn create_get_list_paginate() {
    let server = ApiServer::start().await.unwrap();
    let client = server.client().unwrap();
    let api = vmleases(&client, "team-a");
    for i in 0..5 {
        let mut o = vmlease(&format!("l{i}"), json!({"user": "u"}));
        o.metadata.labels = Some([("parity".to_string(), (i % 2).to_string())].into());
        let created = api.create(&PostParams::default(), &o).await.unwrap();
        assert_eq!(created.metadata.generation, Some(1));
        assert!(created.metadata.uid.is_some());
        assert!(created.metadata.creation_timestamp.is_some());
    }
    vmleases(&client, "team-b")
        .create(&PostParams::default(), &vmlease("other", json!({})))
        .await
        .unwrap();

    let got = api.get("l3").await.unwrap();
    assert_eq!(got.data["spec"]["user"], "u");
    assert!(api.get_opt("missing").await.unwrap().is_none());
    let e = api_err(api.get("missing").await.unwrap_err());
    assert_eq!((e.code, e.reason.as_str()), (404, "NotFound"));
    let e = api_err(
        api.create(&PostParams::default(), &vmlease("l0", json!({})))
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (409, "AlreadyExists"));

    // Pagination.
    let mut names = Vec::new();
    let mut lp = ListParams::default().limit(2);
    let mut pages = 0;
    loop {
        let page = api.list(&lp).await.unwrap();
        pages += 1;
        assert!(page.items.len() <= 2);
        names.extend(page.items.iter().map(|o| o.name_any()));
        for o in &page.items {
            assert_eq!(o.types.as_ref().map(|t| t.kind.as_str()), Some("VMLease"));
        }
        match page.metadata.continue_ {
            Some(c) if !c.is_empty() => lp = lp.continue_token(&c),
            _ => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(names, vec!["l0", "l1", "l2", "l3", "l4"]);

    // All namespaces, selectors.
    let all: Api<DynamicObject> = Api::all_with(client.clone(), &ar("VMLease", "vmleases"));
    assert_eq!(
        all.list(&ListParams::default()).await.unwrap().items.len(),
        6
    );
    let odd = api
        .list(&ListParams::default().labels("parity=1"))
        .await
        .unwrap();
    assert_eq!(
        odd.items.iter().map(|o| o.name_any()).collect::<Vec<_>>(),
        vec!["l1", "l3"]
    );
    let named = all
        .list(&ListParams::default().fields("metadata.name=other"))
        .await
        .unwrap();
    assert_eq!(named.items.len(), 1);
    let e = api_err(
        all.list(&ListParams::default().fields("spec.user=u"))
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 400);

    // Cluster-scoped resources, direct reads.
    let mut pool = DynamicObject::new("pool", &ar("IPPool", "ippools"));
    pool.data = json!({"spec": {"cidr": "10.0.0.0/24"}});
    ippools(&client)
        .create(&PostParams::default(), &pool)
        .await
        .unwrap();
    let stored = server
        .object("keyway.dev", "ippools", None, "pool")
        .unwrap();
    assert!(stored["metadata"].get("namespace").is_none());
    assert_eq!(server.objects("keyway.dev", "vmleases").len(), 6);
    assert!(
        server
            .object("keyway.dev", "vmleases", Some("team-a"), "l0")
            .is_some()
    );
}

#[tokio::test]
async fn watcher_sees_create_modify_delete() {
    let server = ApiServer::start().await.unwrap();
    let client = server.client().unwrap();
    let api = vmleases(&client, "ns");
    api.create(&PostParams::default(), &vmlease("before", json!({})))
        .await
        .unwrap();
    let mut w = watcher(api.clone(), watcher::Config::default()).boxed();
    let mut initial = Vec::new();
    within("initial list", async {
        loop {
            match w.try_next().await.unwrap().unwrap() {
                watcher::Event::InitApply(o) => initial.push(o.name_any()),
                watcher::Event::InitDone => break,
                _ => {}
            }
        }
    })
    .await;
    assert_eq!(initial, vec!["before"]);

    api.create(&PostParams::default(), &vmlease("x", json!({"user": "a"})))
        .await
        .unwrap();
    api.patch(
        "x",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"user": "b"}})),
    )
    .await
    .unwrap();
    api.delete("x", &DeleteParams::default()).await.unwrap();
    let mut seen = Vec::new();
    within("create/modify/delete events", async {
        while seen.len() < 3 {
            match w.try_next().await.unwrap().unwrap() {
                watcher::Event::Apply(o) => {
                    seen.push(format!("apply:{}:{}", o.name_any(), o.data["spec"]["user"]))
                }
                watcher::Event::Delete(o) => seen.push(format!("delete:{}", o.name_any())),
                _ => {}
            }
        }
    })
    .await;
    assert_eq!(seen, vec!["apply:x:\"a\"", "apply:x:\"b\"", "delete:x"]);
}

#[tokio::test]
async fn streaming_list_watcher_and_bookmarks() {
    let server = ApiServer::start_with(Options {
        bookmark_interval: Duration::from_millis(50),
        ..Default::default()
    })
    .await
    .unwrap();
    let client = server.client().unwrap();
    let api = vmleases(&client, "ns");
    api.create(&PostParams::default(), &vmlease("a", json!({})))
        .await
        .unwrap();
    let mut w = watcher(api.clone(), watcher::Config::default().streaming_lists()).boxed();
    let mut initial = Vec::new();
    within("streaming initial events", async {
        loop {
            match w.try_next().await.unwrap().unwrap() {
                watcher::Event::InitApply(o) => initial.push(o.name_any()),
                watcher::Event::InitDone => break,
                _ => {}
            }
        }
    })
    .await;
    assert_eq!(initial, vec!["a"]);
    let watch_req = server
        .requests()
        .into_iter()
        .find(|r| r.query.contains("watch=true"))
        .unwrap();
    assert!(watch_req.query.contains("sendInitialEvents=true"));

    // Raw watch with bookmarks: a BOOKMARK arrives carrying the current RV.
    let rv = server.resource_version().to_string();
    let wp = WatchParams {
        bookmarks: true,
        ..Default::default()
    };
    let mut raw_stream = api.watch(&wp, &rv).await.unwrap().boxed();
    let ev = within("bookmark", raw_stream.try_next())
        .await
        .unwrap()
        .unwrap();
    match ev {
        WatchEvent::Bookmark(b) => assert_eq!(b.metadata.resource_version, rv),
        other => panic!("expected a bookmark, got {other:?}"),
    }
}

#[tokio::test]
async fn too_old_resource_version_gets_410_and_watcher_relists() {
    let server = ApiServer::start_with(Options {
        history_limit: 3,
        ..Default::default()
    })
    .await
    .unwrap();
    let client = server.client().unwrap();
    let api = vmleases(&client, "ns");
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "ns");
    let first = api
        .create(&PostParams::default(), &vmlease("a", json!({})))
        .await
        .unwrap();
    let old_rv = first.resource_version().unwrap();

    let mut w = watcher(api.clone(), watcher::Config::default().disable_bookmarks()).boxed();
    within("init", async {
        loop {
            if let watcher::Event::InitDone = w.try_next().await.unwrap().unwrap() {
                break;
            }
        }
    })
    .await;
    api.create(&PostParams::default(), &vmlease("b", json!({})))
        .await
        .unwrap();
    within("apply b", async {
        loop {
            if let watcher::Event::Apply(o) = w.try_next().await.unwrap().unwrap() {
                assert_eq!(o.name_any(), "b");
                break;
            }
        }
    })
    .await;
    // Push the watcher's resourceVersion out of the retained history.
    for i in 0..5 {
        let cm = ConfigMap {
            metadata: kube::api::ObjectMeta {
                name: Some(format!("c{i}")),
                ..Default::default()
            },
            ..Default::default()
        };
        cms.create(&PostParams::default(), &cm).await.unwrap();
    }

    // A raw watch from the old RV gets one ERROR 410 event.
    let mut raw_stream = api
        .watch(&WatchParams::default(), &old_rv)
        .await
        .unwrap()
        .boxed();
    match within("410 event", raw_stream.try_next())
        .await
        .unwrap()
        .unwrap()
    {
        WatchEvent::Error(e) => {
            assert_eq!((e.code, e.reason.as_str()), (410, "Expired"));
            assert!(e.message.starts_with("too old resource version"));
        }
        other => panic!("expected an ERROR event, got {other:?}"),
    }
    assert!(
        within("end of 410 stream", raw_stream.try_next())
            .await
            .unwrap()
            .is_none()
    );

    // The running watcher's stream is cut; it re-watches, gets 410 and re-lists.
    server.close_watches();
    let mut saw_410 = false;
    let mut relisted = Vec::new();
    within("relist after 410", async {
        loop {
            match w.next().await.unwrap() {
                Err(watcher::Error::WatchError(s)) if s.code == 410 => saw_410 = true,
                Err(e) => panic!("unexpected watcher error {e:?}"),
                Ok(watcher::Event::InitApply(o)) => relisted.push(o.name_any()),
                Ok(watcher::Event::InitDone) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(saw_410);
    assert_eq!(relisted, vec!["a", "b"]);
}

#[tokio::test]
async fn watch_timeout_cap_ends_streams() {
    let server = ApiServer::start_with(Options {
        watch_timeout_cap: Some(Duration::from_millis(200)),
        ..Default::default()
    })
    .await
    .unwrap();
    let client = server.client().unwrap();
    let api = vmleases(&client, "ns");
    let mut s = api
        .watch(&WatchParams::default(), "0")
        .await
        .unwrap()
        .boxed();
    assert!(within("stream end", s.try_next()).await.unwrap().is_none());
}

#[tokio::test]
async fn merge_json_and_apply_patches() {
    let server = ApiServer::start().await.unwrap();
    let client = server.client().unwrap();
    let api = vmleases(&client, "ns");
    api.create(
        &PostParams::default(),
        &vmlease("p", json!({"user": "u", "keep": true})),
    )
    .await
    .unwrap();

    let o = api
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"user": null, "n": 1}})),
        )
        .await
        .unwrap();
    assert_eq!(o.data["spec"], json!({"keep": true, "n": 1}));
    assert_eq!(o.metadata.generation, Some(2));

    let jp: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/spec/n", "value": 1},
        {"op": "replace", "path": "/spec/n", "value": 2}
    ]))
    .unwrap();
    let o = api
        .patch("p", &PatchParams::default(), &Patch::Json::<()>(jp))
        .await
        .unwrap();
    assert_eq!(o.data["spec"]["n"], 2);
    let failing: json_patch::Patch =
        serde_json::from_value(json!([{"op": "test", "path": "/spec/n", "value": 1}])).unwrap();
    let e = api_err(
        api.patch("p", &PatchParams::default(), &Patch::Json::<()>(failing))
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (422, "Invalid"));

    // Server-side apply: create, then drop a field the manager owned.
    let ssa = PatchParams::apply("keyway-test").force();
    let applied = json!({
        "apiVersion": "keyway.dev/v1alpha1", "kind": "VMLease",
        "metadata": {"name": "s", "labels": {"a": "1", "b": "2"}},
        "spec": {"user": "x", "extra": "y"}
    });
    let o = api.patch("s", &ssa, &Patch::Apply(&applied)).await.unwrap();
    assert_eq!(o.data["spec"], json!({"user": "x", "extra": "y"}));
    let reduced = json!({
        "apiVersion": "keyway.dev/v1alpha1", "kind": "VMLease",
        "metadata": {"name": "s", "labels": {"a": "1"}},
        "spec": {"user": "x"}
    });
    let o = api.patch("s", &ssa, &Patch::Apply(&reduced)).await.unwrap();
    assert_eq!(o.data["spec"], json!({"user": "x"}));
    assert_eq!(o.labels().len(), 1);
    let rec = server
        .requests()
        .into_iter()
        .rev()
        .find(|r| r.method == "PATCH")
        .unwrap();
    assert_eq!(rec.field_manager.as_deref(), Some("keyway-test"));
    assert_eq!(
        rec.content_type.as_deref(),
        Some("application/apply-patch+yaml")
    );

    // Strategic merge patch: 415 for custom resources, merge semantics for built-ins.
    let e = api_err(
        api.patch(
            "s",
            &PatchParams::default(),
            &Patch::Strategic(json!({"spec": {}})),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (415, "UnsupportedMediaType"));
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "ns");
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "c"}, "data": {"a": "1"}})).unwrap(),
    )
    .await
    .unwrap();
    let c = cms
        .patch(
            "c",
            &PatchParams::default(),
            &Patch::Strategic(json!({"data": {"b": "2"}})),
        )
        .await
        .unwrap();
    assert_eq!(c.data.unwrap().len(), 2);
}

#[tokio::test]
async fn status_subresource_is_separate() {
    let server = ApiServer::start().await.unwrap();
    let client = server.client().unwrap();
    let api = vmleases(&client, "ns");
    let mut o = vmlease("s", json!({"user": "u"}));
    o.data["status"] = json!({"phase": "Injected"});
    let created = api.create(&PostParams::default(), &o).await.unwrap();
    assert!(
        created.data.get("status").is_none(),
        "status dropped on create"
    );

    // Main resource patches cannot change status...
    let o = api
        .patch(
            "s",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "X"}, "spec": {"user": "v"}})),
        )
        .await
        .unwrap();
    assert!(o.data.get("status").is_none());
    assert_eq!(o.data["spec"]["user"], "v");

    // ...status patches change only status (SSA on /status, as controllers do)...
    let ssa = PatchParams::apply("keyway-controller").force();
    let status = json!({"apiVersion": "keyway.dev/v1alpha1", "kind": "VMLease", "status": {"phase": "Ready"}, "spec": {"user": "ignored"}});
    let o = api
        .patch_status("s", &ssa, &Patch::Apply(&status))
        .await
        .unwrap();
    assert_eq!(o.data["status"]["phase"], "Ready");
    assert_eq!(o.data["spec"]["user"], "v");
    assert_eq!(
        o.metadata.generation,
        Some(2),
        "status writes keep generation"
    );

    // ...and replace of the main resource keeps the stored status.
    let mut cur = api.get("s").await.unwrap();
    cur.data["status"] = json!({"phase": "Overwritten"});
    cur.data["spec"]["user"] = json!("w");
    let o = api
        .replace("s", &PostParams::default(), &cur)
        .await
        .unwrap();
    assert_eq!(o.data["status"]["phase"], "Ready");
    assert_eq!(o.data["spec"]["user"], "w");

    // replace_status takes only the status.
    let mut cur = api.get("s").await.unwrap();
    cur.data["status"] = json!({"phase": "Done"});
    cur.data["spec"]["user"] = json!("ignored");
    let o = api
        .replace_status("s", &PostParams::default(), &cur)
        .await
        .unwrap();
    assert_eq!(o.data["status"]["phase"], "Done");
    assert_eq!(o.data["spec"]["user"], "w");
    let st = api.get_status("s").await.unwrap();
    assert_eq!(st.data["status"]["phase"], "Done");

    // /status on a missing object, SSA.
    let e = api_err(
        api.patch_status("missing", &ssa, &Patch::Apply(&status))
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 404);
}

#[tokio::test]
async fn stale_resource_versions_conflict_and_leases_work() {
    let server = ApiServer::start().await.unwrap();
    let client = server.client().unwrap();
    let api = vmleases(&client, "ns");
    let v1 = api
        .create(&PostParams::default(), &vmlease("c", json!({"n": 1})))
        .await
        .unwrap();
    let mut v2 = v1.clone();
    v2.data["spec"]["n"] = json!(2);
    api.replace("c", &PostParams::default(), &v2).await.unwrap();
    let e = api_err(
        api.replace("c", &PostParams::default(), &v2)
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (409, "Conflict"));
    assert!(e.message.contains("the object has been modified"));
    let stale_patch =
        json!({"metadata": {"resourceVersion": v1.resource_version()}, "spec": {"n": 3}});
    let e = api_err(
        api.patch("c", &PatchParams::default(), &Patch::Merge(stale_patch))
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 409);

    // Leader election on coordination.k8s.io/v1 Leases.
    let leases: Api<Lease> = Api::namespaced(client.clone(), "keyway-system");
    let mut lease: Lease = serde_json::from_value(json!({
        "metadata": {"name": "keyway-operator"},
        "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15}
    }))
    .unwrap();
    let created = leases.create(&PostParams::default(), &lease).await.unwrap();
    let e = api_err(
        leases
            .create(&PostParams::default(), &lease)
            .await
            .unwrap_err(),
    );
    assert_eq!(e.reason, "AlreadyExists");
    lease = created.clone();
    lease.spec.as_mut().unwrap().holder_identity = Some("b".into());
    let taken = leases
        .replace("keyway-operator", &PostParams::default(), &lease)
        .await
        .unwrap();
    assert_eq!(taken.spec.unwrap().holder_identity.as_deref(), Some("b"));
    let mut loser = created;
    loser.spec.as_mut().unwrap().holder_identity = Some("c".into());
    let e = api_err(
        leases
            .replace("keyway-operator", &PostParams::default(), &loser)
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 409);
    // Built-in types allow unconditional replace.
    loser.metadata.resource_version = None;
    leases
        .replace("keyway-operator", &PostParams::default(), &loser)
        .await
        .unwrap();
}

#[tokio::test]
async fn delete_with_finalizers() {
    let server = ApiServer::start().await.unwrap();
    let client = server.client().unwrap();
    let api = vmleases(&client, "ns");
    let mut o = vmlease("f", json!({}));
    o.metadata.finalizers = Some(vec!["keyway.dev/cleanup".into()]);
    api.create(&PostParams::default(), &o).await.unwrap();
    let mut w = watcher(api.clone(), watcher::Config::default()).boxed();
    within("init", async {
        loop {
            if let watcher::Event::InitDone = w.try_next().await.unwrap().unwrap() {
                break;
            }
        }
    })
    .await;

    let deleted = api.delete("f", &DeleteParams::default()).await.unwrap();
    let obj = deleted.left().expect("object while finalizers are pending");
    assert!(obj.metadata.deletion_timestamp.is_some());
    let still = api.get("f").await.unwrap();
    assert!(still.metadata.deletion_timestamp.is_some());
    assert_eq!(still.metadata.generation, Some(2));

    // Adding a finalizer now is refused.
    let e = api_err(
        api.patch(
            "f",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": ["keyway.dev/cleanup", "new"]}})),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(e.code, 422);

    // Removing the finalizer (as kube-runtime's finalizer helper does) deletes it.
    let jp: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/metadata/finalizers/0", "value": "keyway.dev/cleanup"},
        {"op": "remove", "path": "/metadata/finalizers/0"}
    ]))
    .unwrap();
    api.patch("f", &PatchParams::default(), &Patch::Json::<()>(jp))
        .await
        .unwrap();
    assert!(api.get_opt("f").await.unwrap().is_none());
    within("deletion events", async {
        let mut saw_ts = false;
        loop {
            match w.try_next().await.unwrap().unwrap() {
                watcher::Event::Apply(o) if o.metadata.deletion_timestamp.is_some() => {
                    saw_ts = true
                }
                watcher::Event::Delete(o) => {
                    assert_eq!(o.name_any(), "f");
                    break;
                }
                _ => {}
            }
        }
        assert!(saw_ts);
    })
    .await;
    let e = api_err(api.delete("f", &DeleteParams::default()).await.unwrap_err());
    assert_eq!(e.code, 404);

    // Preconditions.
    let p = api
        .create(&PostParams::default(), &vmlease("p", json!({})))
        .await
        .unwrap();
    let e = api_err(
        api.delete(
            "p",
            &DeleteParams::default().preconditions(kube::api::Preconditions {
                resource_version: Some("1".into()),
                uid: None,
            }),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(e.code, 409);
    api.delete(
        "p",
        &DeleteParams::default().preconditions(kube::api::Preconditions {
            resource_version: p.resource_version(),
            uid: p.uid(),
        }),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn noop_writes_do_not_bump_resource_version() {
    let server = ApiServer::start().await.unwrap();
    let client = server.client().unwrap();
    let api = vmleases(&client, "ns");
    let o = api
        .create(&PostParams::default(), &vmlease("n", json!({"a": 1})))
        .await
        .unwrap();
    let patch = Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}}));
    let p1 = api
        .patch("n", &PatchParams::default(), &patch)
        .await
        .unwrap();
    assert_ne!(p1.resource_version(), o.resource_version());
    let before = server.resource_version();
    let p2 = api
        .patch("n", &PatchParams::default(), &patch)
        .await
        .unwrap();
    assert_eq!(p2.resource_version(), p1.resource_version());
    let r = api.replace("n", &PostParams::default(), &p2).await.unwrap();
    assert_eq!(r.resource_version(), p1.resource_version());
    let ssa = PatchParams::apply("m");
    let applied = json!({"apiVersion": "keyway.dev/v1alpha1", "kind": "VMLease", "spec": {"a": 1}});
    let a = api.patch("n", &ssa, &Patch::Apply(&applied)).await.unwrap();
    assert_eq!(a.resource_version(), p1.resource_version());
    assert_eq!(server.resource_version(), before);
}

#[tokio::test]
async fn discovery_finds_resources() {
    let server = ApiServer::start().await.unwrap();
    let client = server.client().unwrap();
    let version = client.apiserver_version().await.unwrap();
    assert_eq!(version.major, "1");
    let d = kube::discovery::Discovery::new(client.clone())
        .run()
        .await
        .unwrap();
    let gvk = kube::api::GroupVersionKind::gvk("keyway.dev", "v1alpha1", "VMLease");
    let (res, caps) = d.resolve_gvk(&gvk).unwrap();
    assert_eq!(res.plural, "vmleases");
    assert_eq!(caps.scope, kube::discovery::Scope::Namespaced);
    assert!(
        caps.subresources
            .iter()
            .any(|(s, _)| s.plural == "vmleases/status" || s.plural == "status")
    );
    let pool = kube::api::GroupVersionKind::gvk("keyway.dev", "v1alpha1", "IPPool");
    assert_eq!(
        d.resolve_gvk(&pool).unwrap().1.scope,
        kube::discovery::Scope::Cluster
    );
    for (g, v, k) in [
        ("coordination.k8s.io", "v1", "Lease"),
        ("events.k8s.io", "v1", "Event"),
        ("", "v1", "Secret"),
        ("", "v1", "Namespace"),
        ("", "v1", "ConfigMap"),
        ("", "v1", "Event"),
    ] {
        assert!(
            d.resolve_gvk(&kube::api::GroupVersionKind::gvk(g, v, k))
                .is_some(),
            "{k}"
        );
    }
    let agg = kube::discovery::Discovery::new(client.clone())
        .run_aggregated()
        .await
        .unwrap();
    let (res, _) = agg.resolve_gvk(&gvk).unwrap();
    assert_eq!(res.plural, "vmleases");
    let one = kube::discovery::oneshot::pinned_kind(&client, &gvk)
        .await
        .unwrap();
    assert_eq!(one.0.plural, "vmleases");
}

#[tokio::test]
async fn events_recorder_publishes_twice() {
    let server = ApiServer::start().await.unwrap();
    let client = server.client().unwrap();
    let api = vmleases(&client, "ns");
    let obj = api
        .create(&PostParams::default(), &vmlease("e", json!({})))
        .await
        .unwrap();
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "keyway-operator".into(),
            instance: Some("test".into()),
        },
    );
    let reference = obj.object_ref(&ar("VMLease", "vmleases"));
    let ev = Event {
        type_: EventType::Normal,
        reason: "Allocated".into(),
        note: Some("allocated an address".into()),
        action: "Allocate".into(),
        secondary: None,
    };
    recorder.publish(&ev, &reference).await.unwrap();
    recorder.publish(&ev, &reference).await.unwrap();
    let events: Api<K8sEvent> = Api::namespaced(client.clone(), "ns");
    let list = events.list(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 1);
    let e = &list.items[0];
    assert_eq!(e.reason.as_deref(), Some("Allocated"));
    assert_eq!(e.series.as_ref().map(|s| s.count), Some(2));
    let methods: Vec<String> = server
        .requests()
        .into_iter()
        .filter(|r| r.path.contains("/events"))
        .map(|r| format!("{} {}", r.method, r.status))
        .collect();
    assert_eq!(methods, vec!["POST 201", "PATCH 200", "GET 200"]);
}

#[tokio::test]
async fn fail_next_injects_errors() {
    let server = ApiServer::start().await.unwrap();
    let client = server.client().unwrap();
    let api = vmleases(&client, "ns");
    api.create(&PostParams::default(), &vmlease("a", json!({})))
        .await
        .unwrap();
    server.fail_next("GET", "vmleases", 2, 500);
    server.fail_next("*", "*", 1, 409);
    for _ in 0..2 {
        let e = api_err(api.get("a").await.unwrap_err());
        assert_eq!((e.code, e.reason.as_str()), (500, "InternalError"));
    }
    let e = api_err(
        api.patch("a", &PatchParams::default(), &Patch::Merge(json!({})))
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (409, "Conflict"));
    api.get("a").await.unwrap();
    let statuses: Vec<u16> = server.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![201, 500, 500, 409, 200]);

    // kube's default client retries 429/503/504 by itself: the injected 503s
    // are absorbed and the request log shows the retries.
    server.clear_requests();
    server.fail_next("GET", "vmleases", 2, 503);
    api.get("a").await.unwrap();
    let statuses: Vec<u16> = server.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![503, 503, 200]);

    // With retries off, the 503 surfaces.
    let mut config = kube::Config::new(server.url().parse().unwrap());
    config.default_retry = false;
    let no_retry = vmleases(&Client::try_from(config).unwrap(), "ns");
    server.fail_next("GET", "vmleases", 1, 503);
    let e = api_err(no_retry.get("a").await.unwrap_err());
    assert_eq!((e.code, e.reason.as_str()), (503, "ServiceUnavailable"));
}

#[tokio::test]
async fn kubeconfig_and_bearer_token() {
    let server = ApiServer::start().await.unwrap();
    let dir = std::env::temp_dir().join(format!("keyway-apiserver-double-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("kubeconfig");
    server.write_kubeconfig(&path, "s3cret").unwrap();
    let kc = kube::config::Kubeconfig::read_from(&path).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    assert_eq!(config.default_namespace, "default");
    let client = Client::try_from(config).unwrap();
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    assert!(
        cms.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    let last = server.requests().pop().unwrap();
    assert_eq!(last.user.as_deref(), Some("s3cret"));
    assert_eq!(last.path, "/api/v1/namespaces/default/configmaps");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn metadata_only_requests() {
    let server = ApiServer::start().await.unwrap();
    let client = server.client().unwrap();
    let api = vmleases(&client, "ns");
    api.create(
        &PostParams::default(),
        &vmlease("m", json!({"big": "spec"})),
    )
    .await
    .unwrap();
    let list = api.list_metadata(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 1);
    assert_eq!(list.items[0].metadata.name.as_deref(), Some("m"));
    let one = api.get_metadata("m").await.unwrap();
    assert_eq!(one.metadata.generation, Some(1));
    let meta_api: Api<kube::core::PartialObjectMeta<DynamicObject>> =
        Api::namespaced_with(client.clone(), "ns", &ar("VMLease", "vmleases"));
    let mut w = watcher(meta_api, watcher::Config::default()).boxed();
    within("metadata watcher", async {
        loop {
            if let watcher::Event::InitApply(o) = w.try_next().await.unwrap().unwrap() {
                assert_eq!(o.metadata.name.as_deref(), Some("m"));
                break;
            }
        }
    })
    .await;
}

#[tokio::test]
async fn bad_requests_are_status_errors() {
    let server = ApiServer::start().await.unwrap();
    let url = server.url();
    let coll = "/apis/keyway.dev/v1alpha1/namespaces/ns/vmleases";
    let json_ct = [("Content-Type", "application/json")];
    let (code, body) = raw(&url, "POST", coll, &json_ct, b"{not json").await;
    assert_eq!(code, 400);
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["kind"], "Status");
    assert_eq!(status["reason"], "BadRequest");
    let big = vec![b' '; 9 * 1024 * 1024];
    let (code, _) = raw(&url, "POST", coll, &json_ct, &big).await;
    assert_eq!(code, 413);
    let (code, body) = raw(&url, "GET", "/apis/nope.dev/v1/things", &[], b"").await;
    assert_eq!(code, 404);
    assert!(body.contains("NotFound"));
    let (code, _) = raw(&url, "PUT", coll, &json_ct, b"{}").await;
    assert_eq!(code, 405);
    let (code, _) = raw(&url, "PATCH", &format!("{coll}/x"), &json_ct, b"{}").await;
    assert_eq!(code, 415);
    let (code, _) = raw(
        &url,
        "POST",
        coll,
        &[("Content-Type", "application/vnd.kubernetes.protobuf")],
        b"x",
    )
    .await;
    assert_eq!(code, 415);
    let (code, _) = raw(
        &url,
        "GET",
        &format!("{coll}?labelSelector=a%20b%20c"),
        &[],
        b"",
    )
    .await;
    assert_eq!(code, 400);
    let (code, _) = raw(
        &url,
        "GET",
        &format!("{coll}?watch=true&resourceVersion=abc"),
        &[],
        b"",
    )
    .await;
    assert_eq!(code, 400);
    let (code, body) = raw(&url, "GET", "/healthz", &[], b"").await;
    assert_eq!((code, body.as_str()), (200, "ok"));
    // YAML create works.
    let yaml = b"apiVersion: keyway.dev/v1alpha1\nkind: VMLease\nmetadata:\n  name: y\nspec: {}\n";
    let (code, _) = raw(
        &url,
        "POST",
        coll,
        &[("Content-Type", "application/yaml")],
        yaml,
    )
    .await;
    assert_eq!(code, 201);
    // Cluster-wide POST for a namespaced kind is refused.
    let (code, _) = raw(
        &url,
        "POST",
        "/apis/keyway.dev/v1alpha1/vmleases",
        &json_ct,
        b"{}",
    )
    .await;
    assert_eq!(code, 405);
    // Delete collection.
    let (code, body) = raw(&url, "DELETE", coll, &[], b"").await;
    assert_eq!(code, 200);
    assert!(body.contains("\"y\""));
    assert!(server.objects("keyway.dev", "vmleases").is_empty());
}
