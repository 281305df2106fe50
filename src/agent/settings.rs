//! The agent's own configuration file: `grapevine agent --config FILE.toml`.
//!
//! Every agent flag has a field of the same name (dashes become underscores); a flag given on
//! the command line overrides the file's value (for lists such as `join` and `service`, the
//! command line's list replaces the file's). Unknown fields are refused with their name, so
//! a typo never passes silently.
//!
//! ```toml
//! name = "node-1"
//! bind = "0.0.0.0:7946"
//! advertise = "10.0.0.5:7946"
//! join = ["10.0.0.6:7946", "seeds.internal:7946"]
//! profile = "lan"
//! data_dir = "/var/lib/grapevine"
//! http = "127.0.0.1:8500"
//! cluster_label = "prod"
//! keyring = "/etc/grapevine/keyring.json"   # or: encrypt = "BASE64KEY"
//! config_file = "/etc/grapevine/keys.toml"  # config keys imported at start
//! allow_remote_control = false
//! dns = "127.0.0.1:8600"
//! dns_domain = "consul."
//! dns_service_ttl = ["web=30s"]
//! otlp_endpoint = "http://127.0.0.1:4318"     # needs the `opentelemetry` feature
//!
//! [[service]]
//! name = "web"
//! port = 8080
//! tags = ["v2", "primary"]
//! meta = { version = "2.1" }
//! check = { tcp = true, interval = "5s" }
//!
//! [[service]]
//! name = "worker"
//! id = "worker-a"
//! port = 9000
//! address = "10.0.0.7"
//! check = { ttl = "30s" }                    # reports in through the HTTP API
//! ```
//!
//! A service without `check` gets the TCP check that `--service` gets (none with
//! `no_check = true`).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::node::Check;
use crate::state::catalog::Service;

/// The largest agent configuration file read (it holds flags, not data).
pub const MAX_SETTINGS_BYTES: u64 = 1024 * 1024;

/// Why an agent configuration file was refused.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The file is larger than [`MAX_SETTINGS_BYTES`].
    #[error("{path} is {size} bytes; an agent configuration file may hold at most 1 MiB")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// The file is not valid TOML, or has an unknown field or a value of the wrong type.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, naming the field, line and column.
        message: String,
    },
    /// A field's value is invalid.
    #[error("{path}: {field}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The field.
        field: String,
        /// What is wrong.
        message: String,
    },
}

/// The agent's settings as written in the file; every field is optional.
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AgentSettings {
    /// `--name`.
    pub name: Option<String>,
    /// `--bind`.
    pub bind: Option<String>,
    /// `--advertise`.
    pub advertise: Option<String>,
    /// `--join` (a list).
    #[serde(default)]
    pub join: Vec<String>,
    /// `--profile`.
    pub profile: Option<String>,
    /// `--service`, as tables (`[[service]]`).
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceSettings>,
    /// `--no-check`.
    pub no_check: Option<bool>,
    /// `--allow-remote-control`.
    pub allow_remote_control: Option<bool>,
    /// `--config-file`.
    pub config_file: Option<PathBuf>,
    /// `--encrypt`.
    pub encrypt: Option<String>,
    /// `--keyring`.
    pub keyring: Option<PathBuf>,
    /// `--cluster-label`.
    pub cluster_label: Option<String>,
    /// `--http`.
    pub http: Option<String>,
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// `--http-token`.
    pub http_token: Option<String>,
    /// `--http-token-file`.
    pub http_token_file: Option<PathBuf>,
    /// `--http-max-wait`.
    pub http_max_wait: Option<String>,
    /// `--http-body-budget` (`"4MiB"`).
    pub http_body_budget: Option<String>,
    /// `--dns`.
    pub dns: Option<String>,
    /// `--dns-domain`.
    pub dns_domain: Option<String>,
    /// `--dns-ttl`.
    pub dns_ttl: Option<String>,
    /// `--dns-service-ttl` (a list of `NAME=DURATION`).
    #[serde(default)]
    pub dns_service_ttl: Vec<String>,
    /// `--otlp-endpoint` (a binary built with the `opentelemetry` feature).
    pub otlp_endpoint: Option<String>,
}

/// One `[[service]]` table.
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServiceSettings {
    /// Service name.
    pub name: String,
    /// Instance id (default `NAME-PORT`, as `--service`).
    pub id: Option<String>,
    /// Port.
    pub port: u16,
    /// Address, if not the node's.
    pub address: Option<IpAddr>,
    /// Tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Metadata.
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
    /// Health check.
    pub check: Option<CheckSettings>,
}

/// A service's `check` table: `{ tcp = true, interval = "5s" }`, `{ ttl = "30s" }`, or
/// `{ none = true }`.
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CheckSettings {
    /// A TCP connect check against the instance's port.
    pub tcp: Option<bool>,
    /// Time between TCP attempts (default: the profile's).
    pub interval: Option<String>,
    /// A TTL check: the service reports in at least this often.
    pub ttl: Option<String>,
    /// No check: always passing.
    pub none: Option<bool>,
}

/// How a service's health is decided, as the file says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckChoice {
    /// Whatever the agent's default is (`no_check` or a TCP check).
    Default,
    /// No check.
    None,
    /// TCP connect every `interval` (`None`: the profile's).
    Tcp(Option<Duration>),
    /// TTL.
    Ttl(Duration),
}

impl CheckChoice {
    /// The check to register with, given the agent's default TCP interval and `no_check`.
    pub fn resolve(self, default_interval: Duration, no_check: bool) -> Option<Check> {
        match self {
            CheckChoice::Default if no_check => None,
            CheckChoice::Default => Some(Check::tcp(default_interval)),
            CheckChoice::None => None,
            CheckChoice::Tcp(interval) => Some(Check::tcp(interval.unwrap_or(default_interval))),
            CheckChoice::Ttl(ttl) => Some(Check::ttl(ttl)),
        }
    }
}

impl AgentSettings {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<AgentSettings, SettingsError> {
        let read = |source| SettingsError::Read {
            path: path.to_path_buf(),
            source,
        };
        let size = std::fs::metadata(path).map_err(read)?.len();
        if size > MAX_SETTINGS_BYTES {
            return Err(SettingsError::TooLarge {
                path: path.to_path_buf(),
                size,
            });
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        Self::parse(path, &text)
    }

    /// Parses the text of `path`.
    pub fn parse(path: &Path, text: &str) -> Result<AgentSettings, SettingsError> {
        let settings: AgentSettings =
            toml::from_str(text).map_err(|error| SettingsError::Parse {
                path: path.to_path_buf(),
                message: error.to_string().trim_end().replace('\n', " "),
            })?;
        for (i, service) in settings.services.iter().enumerate() {
            service
                .to_service()
                .map_err(|message| SettingsError::Invalid {
                    path: path.to_path_buf(),
                    field: format!("service[{i}]"),
                    message,
                })?;
            service
                .check_choice()
                .map_err(|message| SettingsError::Invalid {
                    path: path.to_path_buf(),
                    field: format!("service[{i}].check"),
                    message,
                })?;
        }
        Ok(settings)
    }
}

impl ServiceSettings {
    /// The registration.
    pub fn to_service(&self) -> Result<Service, String> {
        if self.port == 0 {
            return Err(format!("service {:?} has port 0", self.name));
        }
        let id = self
            .id
            .clone()
            .unwrap_or_else(|| format!("{}-{}", self.name, self.port));
        let mut service = Service::new(self.name.clone(), id, self.port);
        service.addr = self.address;
        service.tags = self.tags.clone();
        service.meta = self.meta.clone();
        service.validate().map_err(|error| error.to_string())?;
        Ok(service)
    }

    /// The check the table asks for.
    pub fn check_choice(&self) -> Result<CheckChoice, String> {
        let Some(check) = &self.check else {
            return Ok(CheckChoice::Default);
        };
        let kinds = [
            check.tcp == Some(true),
            check.ttl.is_some(),
            check.none == Some(true),
        ];
        if kinds.iter().filter(|k| **k).count() != 1 {
            return Err("give exactly one of tcp = true, ttl = \"DURATION\", none = true".into());
        }
        if let Some(ttl) = &check.ttl {
            if check.interval.is_some() {
                return Err("interval applies to tcp checks, not ttl".into());
            }
            return parse_duration(ttl).map(CheckChoice::Ttl);
        }
        if check.none == Some(true) {
            return Ok(CheckChoice::None);
        }
        let interval = check.interval.as_deref().map(parse_duration).transpose()?;
        Ok(CheckChoice::Tcp(interval))
    }
}

/// Parses a duration as Consul writes them (`500ms`, `5s`, `1.5m`, `1h`; a bare number is
/// seconds), at least 10 ms.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration =
        crate::http::parse_duration(text).map_err(|error| format!("{text:?}: {error}"))?;
    if duration < Duration::from_millis(10) {
        return Err(format!("{text:?} is shorter than 10ms"));
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<AgentSettings, SettingsError> {
        AgentSettings::parse(Path::new("agent.toml"), text)
    }

    #[test]
    fn the_documented_example_parses() {
        let docs = include_str!("settings.rs");
        let example: String = docs
            .lines()
            .skip_while(|l| !l.starts_with("//! ```toml"))
            .skip(1)
            .take_while(|l| !l.starts_with("//! ```"))
            .map(|l| format!("{}\n", l.trim_start_matches("//!").trim_start()))
            .collect();
        let settings = parse(&example).unwrap();
        assert_eq!(settings.name.as_deref(), Some("node-1"));
        assert_eq!(settings.join.len(), 2);
        assert_eq!(settings.data_dir, Some(PathBuf::from("/var/lib/grapevine")));
        assert_eq!(settings.services.len(), 2);
        assert_eq!(
            settings.otlp_endpoint.as_deref(),
            Some("http://127.0.0.1:4318")
        );
        let web = &settings.services[0];
        assert_eq!(web.to_service().unwrap().id, "web-8080");
        assert_eq!(
            web.check_choice().unwrap(),
            CheckChoice::Tcp(Some(Duration::from_secs(5)))
        );
        let worker = &settings.services[1];
        assert_eq!(worker.to_service().unwrap().id, "worker-a");
        assert_eq!(
            worker.check_choice().unwrap(),
            CheckChoice::Ttl(Duration::from_secs(30))
        );
    }

    #[test]
    fn unknown_fields_are_refused_by_name() {
        let error = parse("name = \"a\"\ndata_dri = \"/x\"\n").unwrap_err();
        assert!(error.to_string().contains("data_dri"), "{error}");
        let error = parse("[[service]]\nname = \"w\"\nport = 1\nprot = 2\n").unwrap_err();
        assert!(error.to_string().contains("prot"), "{error}");
        let error = parse("bind = 7946\n").unwrap_err();
        assert!(error.to_string().contains("bind"), "{error}");
    }

    #[test]
    fn bad_services_and_checks_name_their_table() {
        let error = parse("[[service]]\nname = \"w\"\nport = 0\n").unwrap_err();
        assert!(error.to_string().contains("service[0]"), "{error}");
        let error =
            parse("[[service]]\nname = \"w\"\nport = 1\ncheck = { ttl = \"5d\" }\n").unwrap_err();
        assert!(error.to_string().contains("service[0].check"), "{error}");
        let error =
            parse("[[service]]\nname = \"w\"\nport = 1\ncheck = { tcp = true, ttl = \"5s\" }\n")
                .unwrap_err();
        assert!(error.to_string().contains("exactly one"), "{error}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("1ms").is_err());
        assert!(parse_duration("s").is_err());
    }
}
