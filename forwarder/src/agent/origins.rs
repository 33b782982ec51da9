//! The agent's part in origin load balancing: health verdicts and drains become
//! the availability that the origin tables are built from (`lb`), for the XDP
//! program (UDP) and the TCP proxy alike; UDP flows leave an origin that went
//! down; `forwarder origins` gets its rows from here.

use std::sync::Arc;
use std::time::SystemTime;

use anyhow::{anyhow, bail};
use log::{info, warn};

use super::Agent;
use crate::config::{Config, Protocol};
use crate::lb::health::{CheckResult, Report, Transition};
use crate::lb::{self, Availability};
use crate::telemetry::events::{Event, EventKind, status};
use crate::telemetry::snapshot::{OriginHealth, OriginStatus};

impl Agent {
    /// Starts the health checks of the running config; results go to `report`.
    /// Runs inside the tokio runtime.
    pub fn start_health_checks(&mut self, report: Report) {
        self.checks.apply(&self.config, &report);
        self.report = Some(report);
    }

    /// The availability for `config` from the current verdicts and drains
    /// (origins `config` does not have are left out).
    pub(super) fn availability_for(&self, config: &Config) -> Availability {
        let exists = |(app, origin): &lb::OriginRef| {
            config
                .apps
                .iter()
                .any(|a| a.id == *app && a.origins.iter().any(|o| o.label() == *origin))
        };
        Availability {
            down: self
                .verdicts
                .down()
                .filter(|o| exists(o))
                .cloned()
                .collect(),
            drained: self
                .availability
                .drained
                .iter()
                .filter(|o| exists(o))
                .cloned()
                .collect(),
        }
    }

    /// After a reload was applied: checks follow the new config, and verdicts of
    /// origins it no longer checks are forgotten.
    pub(super) fn restart_health_checks(&mut self) {
        self.verdicts.retain_checked(&self.config);
        if let Some(report) = &self.report {
            self.checks.apply(&self.config, report);
        }
    }

    /// One health check's result: on a change of verdict the origin leaves or
    /// rejoins the tables, its UDP flows move, and an event says so.
    pub fn origin_checked(&mut self, result: CheckResult) -> anyhow::Result<()> {
        if !self.checks.is_current(&result) {
            return Ok(());
        }
        let (app_id, label) = &result.origin;
        let Some(app) = self.config.apps.iter().find(|a| a.id == *app_id) else {
            return Ok(());
        };
        let Some(check) = app.health_check.clone() else {
            return Ok(());
        };
        let Some(transition) = self.verdicts.record(&result, &check) else {
            return Ok(());
        };
        let mut availability = self.availability.clone();
        match transition {
            Transition::WentDown => availability.down.insert(result.origin.clone()),
            Transition::CameUp => availability.down.remove(&result.origin),
        };
        let app = app.clone();
        let up = availability.up_count(&app) as u64;
        match transition {
            Transition::WentDown => warn!(
                "app {app_id}: origin {label} is down (status {}); {up} of {} origins up",
                result.failure.unwrap_or_default(),
                app.origins.len()
            ),
            Transition::CameUp => info!(
                "app {app_id}: origin {label} is up again; {up} of {} origins up",
                app.origins.len()
            ),
        }
        self.set_availability(availability)?;
        if transition == Transition::WentDown && app.protocol == Protocol::Udp {
            let status = result.failure.unwrap_or(status::ORIGIN_UNKNOWN_ERROR);
            self.move_flows_off(app_id, label, status)?;
        }
        let kind = match transition {
            Transition::WentDown => EventKind::OriginDown,
            Transition::CameUp => EventKind::OriginUp,
        };
        let status = result.failure.unwrap_or(status::NORMAL_CLOSE);
        let mut event = Event::summary(
            kind,
            app_id.clone(),
            app.protocol.as_str(),
            status,
            SystemTime::now(),
        );
        if let Some(origin) = app.origins.iter().find(|o| o.label() == *label) {
            event.origin_ip = Some(origin.addr);
            event.origin_port = Some(origin.ports.low);
        }
        event.proxy_protocol = app.proxy_protocol.as_str().to_string();
        event.healthy_origins = Some(up);
        self.events.emit(&event);
        Ok(())
    }

    /// `forwarder drain` (`drained`) and `forwarder enable`: the origin takes no
    /// new connections or flows, or takes them again; open ones are left alone.
    /// Draining the last origin of an app that takes new ones is refused.
    pub fn set_drained(&mut self, app_id: &str, label: &str, drained: bool) -> anyhow::Result<()> {
        let app = self
            .config
            .apps
            .iter()
            .find(|a| a.id == app_id)
            .ok_or_else(|| anyhow!("no app '{app_id}'"))?;
        let origin = app
            .origins
            .iter()
            .find(|o| o.label() == label || o.to_url(app.protocol) == label)
            .ok_or_else(|| {
                let known: Vec<String> = app.origins.iter().map(|o| o.label()).collect();
                anyhow!(
                    "app '{app_id}' has no origin '{label}' (its origins: {})",
                    known.join(", ")
                )
            })?;
        let key = (app_id.to_string(), origin.label());
        let mut availability = self.availability.clone();
        if drained {
            availability.drained.insert(key.clone());
            let left = app
                .origins
                .iter()
                .filter(|o| !availability.is_drained(app_id, &o.label()))
                .count();
            if left == 0 {
                bail!(
                    "'{}' is the last origin of app '{app_id}' not drained; draining it would leave \
                     the app without origins",
                    key.1
                );
            }
        } else {
            availability.drained.remove(&key);
        }
        if availability == self.availability {
            return Ok(());
        }
        info!(
            "app {app_id}: origin {} {}",
            key.1,
            if drained {
                "drained: no new connections or flows; open ones continue"
            } else {
                "enabled again"
            }
        );
        self.set_availability(availability)
    }

    /// Rebuilds the origin tables for `availability` and writes what changed.
    fn set_availability(&mut self, availability: Availability) -> anyhow::Result<()> {
        if let Some(plan) = self.datapath.plan() {
            let plan = plan.with_availability(&self.config, &availability);
            self.datapath.apply(&plan)?;
        }
        self.tcp.set_selections(&self.config, &availability);
        self.availability = availability;
        Ok(())
    }

    /// Moves the live UDP flows of an origin that went down to the ones the
    /// app's table gives them now.
    /// Flows that cannot move end with `status` (the failed check's).
    fn move_flows_off(&mut self, app_id: &str, label: &str, status: u16) -> anyhow::Result<()> {
        let Some(app) = self.config.apps.iter().find(|a| a.id == app_id) else {
            return Ok(());
        };
        let Some(offset) = app.origins.iter().position(|o| o.label() == label) else {
            return Ok(());
        };
        let Some(index) = self.datapath.app_indices().get(app_id).copied() else {
            return Ok(());
        };
        let Some(first) = self
            .datapath
            .plan()
            .and_then(|p| p.apps.get(index as usize))
            .map(|a| a.origin_first)
        else {
            return Ok(());
        };
        let (moved, ended) = self.datapath.move_udp_flows(index, first + offset as u32)?;
        let (now_mono, now_wall) = (crate::udp_flows::monotonic_ns(), SystemTime::now());
        let proxy = app.proxy_protocol.as_str();
        let origin = app.origins.get(offset).map(|o| o.addr);
        for (key, state) in &ended {
            self.events.emit(&crate::udp_flows::flow_event(
                EventKind::Disconnect,
                status,
                key,
                state,
                app_id,
                proxy,
                origin,
                now_mono,
                now_wall,
            ));
        }
        if moved > 0 || !ended.is_empty() {
            info!(
                "app {app_id}: {moved} UDP flows moved off origin {label}, {} ended",
                ended.len()
            );
        }
        Ok(())
    }

    /// The label of each `ORIGINS` slot of the running plan (empty: unused).
    pub(super) fn origin_labels(&self) -> Vec<String> {
        let Some(plan) = self.datapath.plan() else {
            return Vec::new();
        };
        let mut labels = vec![String::new(); plan.origins.len()];
        let indices = self.datapath.app_indices();
        for app in &self.config.apps {
            let Some(info) = indices
                .get(&app.id)
                .and_then(|i| plan.apps.get(*i as usize))
            else {
                continue;
            };
            for (k, origin) in app.origins.iter().enumerate() {
                if let Some(slot) = labels.get_mut(info.origin_first as usize + k) {
                    *slot = origin.label();
                }
            }
        }
        labels
    }

    /// One row per origin of every app, for `forwarder origins` and the metrics.
    pub(super) fn origin_rows(&self) -> Vec<OriginStatus> {
        let tcp = self.tcp.origin_stats();
        let mut rows = Vec::new();
        for app in &self.config.apps {
            let members: Vec<u16> = lb::members(app, &self.availability)
                .into_iter()
                .map(|m| m.offset)
                .collect();
            for (offset, origin) in app.origins.iter().enumerate() {
                let label = origin.label();
                let key = (app.id.clone(), label.clone());
                let verdict = self.verdicts.get(&key);
                let mut row = OriginStatus {
                    app: app.id.clone(),
                    origin: label,
                    protocol: app.protocol.as_str().to_string(),
                    weight: origin.weight,
                    health: match (&app.health_check, verdict) {
                        (None, _) => OriginHealth::Unchecked,
                        (Some(_), Some(v)) if !v.up => OriginHealth::Down,
                        (Some(_), _) => OriginHealth::Up,
                    },
                    drained: self.availability.drained.contains(&key),
                    selected: members.contains(&(offset as u16)),
                    checks: verdict.map_or(0, |v| v.checks),
                    last_failure: verdict.map_or(0, |v| v.last_failure),
                    check_durations: verdict.map(|v| v.durations.clone()),
                    ..OriginStatus::default()
                };
                match app.protocol {
                    Protocol::Tcp => {
                        if let Some(t) = tcp.get(&key) {
                            row.live = t.live;
                            row.connections = t.connections;
                            row.client_bytes = t.client_bytes;
                            row.origin_bytes = t.origin_bytes;
                            row.connect_failures = t.connect_failures.clone();
                        }
                    }
                    Protocol::Udp => {
                        if let Some(u) = self.udp_flows.per_origin.get(&key) {
                            row.live = u.live;
                            row.connections = u.flows;
                            row.client_bytes = u.client_bytes;
                            row.origin_bytes = u.origin_bytes;
                        }
                    }
                }
                rows.push(row);
            }
        }
        rows
    }
}

/// The report function that sends check results to the agent thread.
pub fn report_to(tx: std::sync::mpsc::Sender<super::Command>) -> Report {
    let tx = std::sync::Mutex::new(tx);
    Arc::new(move |result| {
        let _ = tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(super::Command::OriginChecked(result));
    })
}
