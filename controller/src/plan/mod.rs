//! Planning a cluster: the operator's input ([`clusterfile`]), and the per-host kubeadm
//! configuration it turns into ([`kubeadm`]); node labels and selectors ([`select`]). Pure: no I/O, so it is easy to test and to print
//! for `--dry-run`.
pub mod clusterfile;
pub mod ids;
pub mod kubeadm;
pub mod phases;
pub mod preflight;
pub mod resolve;
pub mod select;
pub mod version;
