//! Fleet-wide operations besides cluster rollouts. [`exec`]: `controller exec` (and the one-off
//! tasks other operations ask single hosts, such as the certificate check); [`backup`]: etcd
//! backups and their schedule.
pub mod backup;
pub mod control;
pub mod exec;
