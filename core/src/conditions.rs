//! Builds a status's `conditions` the Kubernetes way: one entry per type, and
//! a condition whose status did not flip keeps its `lastTransitionTime`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// Collects the conditions of one status. `prev` is what the object's status
/// showed before (for transition times).
pub struct Conditions<'a> {
    prev: &'a [Condition],
    generation: Option<i64>,
    now: Timestamp,
    out: Vec<Condition>,
}

impl<'a> Conditions<'a> {
    /// A builder for an object at `generation`, evaluated at `now`.
    pub fn new(prev: &'a [Condition], generation: Option<i64>, now: Timestamp) -> Self {
        Conditions {
            prev,
            generation,
            now,
            out: Vec::new(),
        }
    }

    /// Sets condition `type_` (replacing an earlier one of the same type).
    pub fn set(&mut self, type_: &str, status: bool, reason: &str, message: impl Into<String>) {
        let status = if status { "True" } else { "False" };
        let last_transition_time = self
            .prev
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .map_or(Time(self.now), |c| c.last_transition_time.clone());
        self.out.retain(|c| c.type_ != type_);
        self.out.push(Condition {
            type_: type_.to_string(),
            status: status.to_string(),
            reason: reason.to_string(),
            message: message.into(),
            observed_generation: self.generation,
            last_transition_time,
        });
    }

    /// The conditions, in the order they were first set.
    pub fn finish(self) -> Vec<Condition> {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_condition_that_did_not_flip_keeps_its_transition_time() {
        let t0 = Timestamp::from_second(1_000).unwrap_or_default();
        let t1 = Timestamp::from_second(2_000).unwrap_or_default();
        let mut c = Conditions::new(&[], Some(1), t0);
        c.set("Ready", true, "Valid", "ok");
        c.set("Exhausted", false, "Available", "room");
        let first = c.finish();
        let mut c = Conditions::new(&first, Some(2), t1);
        c.set("Ready", true, "Valid", "still ok");
        c.set("Exhausted", true, "LeasesWaiting", "full");
        let second = c.finish();
        assert_eq!(second[0].last_transition_time, Time(t0));
        assert_eq!(second[0].observed_generation, Some(2));
        assert_eq!(second[1].last_transition_time, Time(t1), "flipped");
        assert_eq!(second[1].status, "True");
    }

    #[test]
    fn setting_a_type_twice_keeps_one() {
        let mut c = Conditions::new(&[], None, Timestamp::UNIX_EPOCH);
        c.set("Routed", false, "NotPublished", "a");
        c.set("Routed", true, "Applied", "b");
        let out = c.finish();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].reason, "Applied");
    }
}
