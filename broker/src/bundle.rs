//! `tether-broker site bundle`: everything one edge cluster needs to bring
//! its site up, as files a GitOps tool (FluxCD, Argo CD) applies: the
//! agent's manifests (the kustomize base in `deploy/kubernetes/agent`) with
//! the site's values, its configuration (brokers, published CIDR) and a
//! Secret holding a fresh one-time enrollment code.
//!
//! Rendering is a pure function of [`Site`]; the command creates the code
//! through the admin API, as `tether-broker token create` does.

use std::fmt::Write as _;

use tether_config::client::ClientFile;

/// The agent's base manifests, as shipped in `deploy/kubernetes/agent`.
const NAMESPACE: &str = include_str!("../../deploy/kubernetes/agent/namespace.yaml");
const PVC: &str = include_str!("../../deploy/kubernetes/agent/pvc.yaml");
const DEPLOYMENT: &str = include_str!("../../deploy/kubernetes/agent/deployment.yaml");

/// The image the base manifests name, replaced by [`Site::image`].
const BASE_IMAGE: &str = "image: tether:latest";

/// How the bundle is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A directory with `kustomization.yaml` and one file per object
    /// (`kubectl apply -k DIR`, a FluxCD Kustomization).
    Kustomize,
    /// One file, `tether-site.yaml`, with every object (`kubectl apply -f`).
    Manifests,
}

/// What the bundle of one site is made of.
#[derive(Debug, Clone)]
pub struct Site {
    /// The site id.
    pub site: String,
    /// Its region.
    pub region: String,
    /// The one-time enrollment code (tt1-…).
    pub code: String,
    /// When the code expires, RFC 3339.
    pub expires: String,
    /// Broker endpoints (`host[:port]`), the first one to enroll with.
    pub brokers: Vec<String>,
    /// The published CIDR.
    pub published_cidr: String,
    /// The agent's container image.
    pub image: String,
}

/// A double-quoted YAML scalar: JSON strings are valid YAML.
fn quoted(text: &str) -> String {
    serde_json::Value::String(text.to_string()).to_string()
}

/// The site's labels, on every object of the bundle.
fn labels(site: &Site) -> String {
    format!(
        "    tether.io/site: {}\n    tether.io/region: {}\n",
        quoted(&site.site),
        quoted(&site.region)
    )
}

/// Adds the site's labels under the first `labels:` of `manifest`
/// (`metadata.labels`; the base files put it first).
fn labelled(manifest: &str, site: &Site) -> String {
    match manifest.find("\n  labels:\n") {
        Some(at) => {
            let end = at + "\n  labels:\n".len();
            format!("{}{}{}", &manifest[..end], labels(site), &manifest[end..])
        }
        None => manifest.to_string(),
    }
}

/// The agent's configuration file for `site`.
pub fn agent_config(site: &Site) -> String {
    let file = ClientFile {
        state_dir: Some("/var/lib/tether".into()),
        published_cidr: site.published_cidr.clone(),
        brokers: site.brokers.clone(),
        ..ClientFile::default()
    };
    format!(
        "# Site {} in region {}. Add lans and services here (tether.toml).\n{}",
        site.site,
        site.region,
        file.to_toml()
    )
}

fn configmap(site: &Site) -> String {
    let mut out = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: tether-agent\n  namespace: tether\n  labels:\n    app.kubernetes.io/name: tether-agent\n    app.kubernetes.io/part-of: tether\n{}data:\n  broker: {}\n  tether.toml: |\n",
        labels(site),
        quoted(site.brokers.first().map(String::as_str).unwrap_or_default()),
    );
    for line in agent_config(site).lines() {
        if line.is_empty() {
            out.push('\n');
        } else {
            let _ = writeln!(out, "    {line}");
        }
    }
    out
}

fn secret(site: &Site) -> String {
    format!(
        "# The one-time enrollment code of site {site} (single use, valid until\n# {expires}). The agent reads it only on its first start; encrypt this file\n# (SOPS, Sealed Secrets) before it goes into a repository.\napiVersion: v1\nkind: Secret\nmetadata:\n  name: tether-enrollment\n  namespace: tether\n  labels:\n    app.kubernetes.io/name: tether-agent\n    app.kubernetes.io/part-of: tether\n{labels}type: Opaque\nstringData:\n  code: {code}\n",
        site = site.site,
        expires = site.expires,
        labels = labels(site),
        code = quoted(&site.code),
    )
}

/// The files of the bundle, as (relative path, content).
pub fn render(site: &Site, format: Format) -> Vec<(String, String)> {
    let deployment = DEPLOYMENT.replace(BASE_IMAGE, &format!("image: {}", quoted(&site.image)));
    let objects = [
        ("namespace.yaml", NAMESPACE.to_string()),
        ("configmap.yaml", configmap(site)),
        ("secret.yaml", secret(site)),
        ("pvc.yaml", labelled(PVC, site)),
        ("deployment.yaml", labelled(&deployment, site)),
    ];
    match format {
        Format::Kustomize => {
            let mut kustomization = format!(
                "# The tether agent of site {} in region {}, rendered by\n# `tether-broker site bundle`.\napiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n",
                site.site, site.region
            );
            for (name, _) in &objects {
                let _ = writeln!(kustomization, "  - {name}");
            }
            let mut files = vec![("kustomization.yaml".to_string(), kustomization)];
            files.extend(objects.into_iter().map(|(n, t)| (n.to_string(), t)));
            files
        }
        Format::Manifests => {
            let all: Vec<String> = objects.into_iter().map(|(_, t)| t).collect();
            vec![("tether-site.yaml".to_string(), all.join("---\n"))]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site() -> Site {
        Site {
            site: "hospital-a".into(),
            region: "eu".into(),
            code: "tt1-abc-def".into(),
            expires: "2026-12-01T00:00:00Z".into(),
            brokers: vec!["broker.example.org".into(), "203.0.113.10:443".into()],
            published_cidr: "203.0.113.0/24".into(),
            image: "registry.example.org/tether:0.1.0".into(),
        }
    }

    #[test]
    fn the_bundle_carries_the_site_s_values() {
        let files = render(&site(), Format::Kustomize);
        let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "kustomization.yaml",
                "namespace.yaml",
                "configmap.yaml",
                "secret.yaml",
                "pvc.yaml",
                "deployment.yaml"
            ]
        );
        let file = |n: &str| files.iter().find(|(f, _)| f == n).map(|(_, t)| t.clone());
        let secret = file("secret.yaml").unwrap_or_default();
        assert!(secret.contains("  code: \"tt1-abc-def\"\n"), "{secret}");
        let config = file("configmap.yaml").unwrap_or_default();
        assert!(
            config.contains("  broker: \"broker.example.org\"\n"),
            "{config}"
        );
        assert!(
            config.contains("    brokers = [\n        \"broker.example.org\",")
                || config.contains("    brokers = [\"broker.example.org\", \"203.0.113.10:443\"]"),
            "{config}"
        );
        let deployment = file("deployment.yaml").unwrap_or_default();
        assert!(
            deployment.contains("image: \"registry.example.org/tether:0.1.0\""),
            "{deployment}"
        );
        assert!(!deployment.contains(BASE_IMAGE));
        assert!(deployment.contains("    tether.io/site: \"hospital-a\"\n"));
    }

    #[test]
    fn the_agent_configuration_is_valid() {
        let text = agent_config(&site());
        let config = ClientFile::parse(&text, "bundle")
            .and_then(|f| f.validate("bundle"))
            .map_err(|e| e.to_string());
        assert!(config.is_ok(), "{config:?}\n{text}");
    }

    #[test]
    fn one_file_holds_every_object() {
        let files = render(&site(), Format::Manifests);
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].1.matches("\nkind: ").count(), 5, "{}", files[0].1);
    }
}
