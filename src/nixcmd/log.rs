//! Nix's `--log-format internal-json` lines, turned into typed [`BuildEvent`]s.
//!
//! With that log format Nix writes one JSON object per line on stderr, after the prefix `@nix `:
//!
//! ```text
//! @nix {"action":"start","id":7,"level":3,"parent":0,"text":"building '/nix/store/…-hello.drv'","type":105,"fields":["/nix/store/…-hello.drv","",1,1]}
//! @nix {"action":"result","id":7,"type":101,"fields":["hello: stdout line"]}
//! @nix {"action":"result","id":7,"type":104,"fields":["installPhase"]}
//! @nix {"action":"stop","id":7}
//! @nix {"action":"msg","level":0,"msg":"\u001b[31;1merror:\u001b[0m builder for '…' failed with exit code 3","raw_msg":"…"}
//! ```
//!
//! `start` opens an activity of some type (105 is building one derivation), `result` reports on an
//! open activity (101 a line of builder output, 104 a phase change, 105 progress counters), `stop`
//! closes it, and `msg` is a message at a verbosity level (0 is an error). Nix 2.8 and 2.26 write the
//! same shapes; 2.26 adds `"parent"` to `start`, and newer versions may add fields, which are
//! ignored. Messages carry ANSI colour codes even when stderr is not a terminal; they are removed.
//!
//! Anything that is not such a line (a crash message, output of a tool that does not know the
//! format) becomes [`BuildEvent::Plain`], so nothing is lost. This module is pure: it only maps text
//! to values, so its tests run on lines captured from both Nix versions
//! (`tests/data/nixcmd/*.log`).

use std::collections::HashMap;

use serde_json::Value;

use crate::nix::store_path::StorePath;

/// The prefix of every internal-json line.
pub const PREFIX: &str = "@nix ";

/// Most build activities tracked at once; a `start` beyond this is still reported, but its log
/// lines are no longer attributed to its derivation. Nix never has nearly this many builds open.
const MAX_TRACKED_BUILDS: usize = 4096;

/// Nix's activity types (`ActivityType` in Nix's `logging.hh`), for `start` lines.
pub mod activity {
    /// Unknown or generic activity, e.g. "querying info about missing paths".
    pub const UNKNOWN: u64 = 0;
    /// Copying one store path.
    pub const COPY_PATH: u64 = 100;
    /// Downloading a file.
    pub const FILE_TRANSFER: u64 = 101;
    /// Realising a set of derivations (the whole command).
    pub const REALISE: u64 = 102;
    /// Copying a set of paths.
    pub const COPY_PATHS: u64 = 103;
    /// The set of builds.
    pub const BUILDS: u64 = 104;
    /// Building one derivation; fields are `[drv path, machine, current round, rounds]`.
    pub const BUILD: u64 = 105;
    /// Optimising the store.
    pub const OPTIMISE_STORE: u64 = 106;
    /// Verifying paths.
    pub const VERIFY_PATHS: u64 = 107;
    /// Substituting one path; fields are `[path, substituter]`.
    pub const SUBSTITUTE: u64 = 108;
    /// Querying path info from a substituter.
    pub const QUERY_PATH_INFO: u64 = 109;
    /// Running the post-build hook.
    pub const POST_BUILD_HOOK: u64 = 110;
    /// Waiting for a build slot or lock.
    pub const BUILD_WAITING: u64 = 111;
}

/// Nix's result types (`ResultType` in Nix's `logging.hh`), for `result` lines.
pub mod result {
    /// A file was hard-linked by store optimisation.
    pub const FILE_LINKED: u64 = 100;
    /// A line of builder output; fields are `[line]`.
    pub const BUILD_LOG_LINE: u64 = 101;
    /// A path failed verification as untrusted.
    pub const UNTRUSTED_PATH: u64 = 102;
    /// A path failed verification as corrupted.
    pub const CORRUPTED_PATH: u64 = 103;
    /// The builder entered a phase; fields are `[phase]`.
    pub const SET_PHASE: u64 = 104;
    /// Progress of an activity; fields are `[done, expected, running, failed]`.
    pub const PROGRESS: u64 = 105;
    /// The expected number of sub-activities; fields are `[activity type, count]`.
    pub const SET_EXPECTED: u64 = 106;
    /// A line of post-build-hook output; fields are `[line]`.
    pub const POST_BUILD_LOG_LINE: u64 = 107;
}

/// A message's verbosity, as Nix numbers them (`Verbosity` in Nix's `logging.hh`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// 0: an error; the command is failing.
    Error,
    /// 1: a warning.
    Warn,
    /// 2: a notice.
    Notice,
    /// 3: normal information, e.g. "these 3 derivations will be built:".
    Info,
    /// 4: shown with `-v`.
    Talkative,
    /// 5: shown with `-vv`.
    Chatty,
    /// 6: debugging output.
    Debug,
    /// 7 and above: everything.
    Vomit,
}

impl Level {
    /// The level for Nix's number; anything above 7 counts as [`Level::Vomit`].
    pub fn from_number(n: u64) -> Self {
        match n {
            0 => Self::Error,
            1 => Self::Warn,
            2 => Self::Notice,
            3 => Self::Info,
            4 => Self::Talkative,
            5 => Self::Chatty,
            6 => Self::Debug,
            _ => Self::Vomit,
        }
    }
}

/// One thing Nix reported while running, from one line of its stderr.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BuildEvent {
    /// Nix started building (or, with `--check`, rebuilding) a derivation.
    BuildStarted {
        /// The activity id; later events of this build carry it.
        activity: u64,
        /// The derivation being built.
        drv: StorePath,
        /// The remote machine building it, if it is not built locally.
        machine: Option<String>,
        /// Nix's description, e.g. `building '/nix/store/…-hello.drv'`.
        text: String,
    },
    /// A build activity ended, successfully or not.
    BuildStopped {
        /// The activity id.
        activity: u64,
        /// The derivation whose build ended.
        drv: StorePath,
    },
    /// A line the builder wrote to its stdout or stderr.
    LogLine {
        /// The activity id of the build.
        activity: u64,
        /// The derivation, if its build was seen starting.
        drv: Option<StorePath>,
        /// The line, without its newline.
        line: String,
    },
    /// The builder announced a new phase (stdenv's `unpackPhase`, `buildPhase`, …).
    Phase {
        /// The activity id of the build.
        activity: u64,
        /// The derivation, if its build was seen starting.
        drv: Option<StorePath>,
        /// The phase name.
        phase: String,
    },
    /// Progress counters of an activity, e.g. builds done out of builds expected.
    Progress {
        /// The activity id.
        activity: u64,
        /// Finished sub-activities.
        done: u64,
        /// Sub-activities expected in total.
        expected: u64,
        /// Sub-activities running now.
        running: u64,
        /// Failed sub-activities.
        failed: u64,
    },
    /// Some other activity started (copying or substituting a path, a download, …).
    ActivityStarted {
        /// The activity id.
        activity: u64,
        /// Its type, one of the [`activity`] constants.
        kind: u64,
        /// Nix's description; may be empty.
        text: String,
    },
    /// Some other activity ended.
    ActivityStopped {
        /// The activity id.
        activity: u64,
    },
    /// A message from Nix itself: an error, a warning, or information.
    Message {
        /// Its verbosity.
        level: Level,
        /// The text without colour codes, as Nix would print it (errors start with `error: `).
        text: String,
    },
    /// A well-formed internal-json line this module does not model (e.g. a result type it does
    /// not know); kept as the JSON text after the prefix.
    Other(String),
    /// A line that is not internal-json at all, unchanged.
    Plain(String),
}

/// Turns internal-json lines into [`BuildEvent`]s, remembering which activity builds which
/// derivation so log lines and phases can name it.
#[derive(Debug, Default)]
pub struct LogParser {
    builds: HashMap<u64, StorePath>,
}

impl LogParser {
    /// A parser that has seen nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses one line of Nix's stderr (with or without its trailing newline).
    pub fn parse(&mut self, line: &str) -> BuildEvent {
        let line = line.strip_suffix('\n').unwrap_or(line);
        let line = line.strip_suffix('\r').unwrap_or(line);
        let Some(json) = line.strip_prefix(PREFIX) else {
            return BuildEvent::Plain(line.to_owned());
        };
        let Ok(Value::Object(object)) = serde_json::from_str::<Value>(json) else {
            return BuildEvent::Plain(line.to_owned());
        };
        let other = || BuildEvent::Other(json.to_owned());
        let id = object.get("id").and_then(Value::as_u64);
        let kind = object.get("type").and_then(Value::as_u64);
        let fields = object
            .get("fields")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        match object.get("action").and_then(Value::as_str) {
            Some("start") => {
                let (Some(activity), Some(kind)) = (id, kind) else {
                    return other();
                };
                let text = object
                    .get("text")
                    .and_then(Value::as_str)
                    .map(strip_controls)
                    .unwrap_or_default();
                if kind == activity::BUILD {
                    let drv = fields
                        .first()
                        .and_then(Value::as_str)
                        .and_then(|s| s.parse::<StorePath>().ok());
                    if let Some(drv) = drv {
                        let machine = fields
                            .get(1)
                            .and_then(Value::as_str)
                            .filter(|m| !m.is_empty())
                            .map(str::to_owned);
                        if self.builds.len() < MAX_TRACKED_BUILDS {
                            self.builds.insert(activity, drv.clone());
                        }
                        return BuildEvent::BuildStarted {
                            activity,
                            drv,
                            machine,
                            text,
                        };
                    }
                }
                BuildEvent::ActivityStarted {
                    activity,
                    kind,
                    text,
                }
            }
            Some("stop") => {
                let Some(activity) = id else {
                    return other();
                };
                match self.builds.remove(&activity) {
                    Some(drv) => BuildEvent::BuildStopped { activity, drv },
                    None => BuildEvent::ActivityStopped { activity },
                }
            }
            Some("result") => {
                let (Some(activity), Some(kind)) = (id, kind) else {
                    return other();
                };
                let drv = || self.builds.get(&activity).cloned();
                let text_field = || fields.first().and_then(Value::as_str).map(str::to_owned);
                match kind {
                    result::BUILD_LOG_LINE => match text_field() {
                        Some(line) => BuildEvent::LogLine {
                            activity,
                            drv: drv(),
                            line,
                        },
                        None => other(),
                    },
                    result::SET_PHASE => match text_field() {
                        Some(phase) => BuildEvent::Phase {
                            activity,
                            drv: drv(),
                            phase,
                        },
                        None => other(),
                    },
                    result::PROGRESS => {
                        let n = |i: usize| fields.get(i).and_then(Value::as_u64);
                        match (n(0), n(1), n(2), n(3)) {
                            (Some(done), Some(expected), Some(running), Some(failed)) => {
                                BuildEvent::Progress {
                                    activity,
                                    done,
                                    expected,
                                    running,
                                    failed,
                                }
                            }
                            _ => other(),
                        }
                    }
                    _ => other(),
                }
            }
            Some("msg") => {
                let level = object.get("level").and_then(Value::as_u64);
                let msg = object.get("msg").and_then(Value::as_str);
                match (level, msg) {
                    (Some(level), Some(msg)) => BuildEvent::Message {
                        level: Level::from_number(level),
                        text: strip_controls(msg),
                    },
                    _ => other(),
                }
            }
            _ => other(),
        }
    }
}

/// A builder's message made safe to print on the client's terminal: ANSI
/// escape sequences (colours, cursor movement, hyperlinks) go, and so does
/// every other control character but newline and tab, C1 controls, carriage
/// return and backspace included, which could otherwise overwrite what the
/// user reads.
pub fn strip_controls(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        // Whether a sequence starts here, and if so whether it is a CSI
        // (ESC [ or its C1 form) rather than an OSC (ESC ] or its C1 form).
        let csi = match c {
            '\u{1b}' => match chars.next() {
                Some('[') => true,
                Some(']') => false,
                // Any other two-character escape, or a lone ESC at the end.
                _ => continue,
            },
            '\u{9b}' => true,
            '\u{9d}' => false,
            '\n' | '\t' => {
                out.push(c);
                continue;
            }
            c if c.is_control() => continue,
            c => {
                out.push(c);
                continue;
            }
        };
        if csi {
            // Parameters and intermediates, then one final byte in @..~.
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        } else {
            // Up to BEL, ST or ESC \.
            while let Some(c) = chars.next() {
                if c == '\u{7}' || c == '\u{9c}' {
                    break;
                }
                if c == '\u{1b}' && chars.peek() == Some(&'\\') {
                    chars.next();
                    break;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELLO_28: &str = include_str!("../../tests/data/nixcmd/realise-hello-2.8.log");
    const HELLO_226: &str = include_str!("../../tests/data/nixcmd/realise-hello-2.26.log");
    const FAIL_28: &str = include_str!("../../tests/data/nixcmd/realise-fail-2.8.log");
    const FAIL_226: &str = include_str!("../../tests/data/nixcmd/realise-fail-2.26.log");
    const NONDET_28: &str = include_str!("../../tests/data/nixcmd/check-nondet-2.8.log");
    const NONDET_226: &str = include_str!("../../tests/data/nixcmd/check-nondet-2.26.log");
    const MULTI_28: &str = include_str!("../../tests/data/nixcmd/realise-multi-dev-2.8.log");
    const MULTI_226: &str = include_str!("../../tests/data/nixcmd/realise-multi-dev-2.26.log");

    fn parse_all(log: &str) -> Vec<BuildEvent> {
        let mut parser = LogParser::new();
        log.lines().map(|line| parser.parse(line)).collect()
    }

    fn errors(events: &[BuildEvent]) -> Vec<&str> {
        events
            .iter()
            .filter_map(|e| match e {
                BuildEvent::Message {
                    level: Level::Error,
                    text,
                } => Some(text.as_str()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn every_captured_line_is_understood() {
        for log in [
            HELLO_28, HELLO_226, FAIL_28, FAIL_226, NONDET_28, NONDET_226, MULTI_28, MULTI_226,
        ] {
            for event in parse_all(log) {
                // 106 (expected counts) is the only result type the captures contain that is not
                // modelled; nothing should fall back to plain text.
                match &event {
                    BuildEvent::Plain(line) => panic!("not parsed: {line}"),
                    BuildEvent::Other(json) => assert!(json.contains("\"type\":106"), "{json}"),
                    _ => {}
                }
            }
        }
    }

    #[test]
    fn successful_build_reports_start_phases_lines_and_stop() {
        for log in [HELLO_28, HELLO_226] {
            let events = parse_all(log);
            let (activity, drv) = events
                .iter()
                .find_map(|e| match e {
                    BuildEvent::BuildStarted {
                        activity,
                        drv,
                        machine: None,
                        text,
                    } => {
                        assert_eq!(text, &format!("building '{drv}'"));
                        Some((*activity, drv.clone()))
                    }
                    _ => None,
                })
                .expect("a build start");
            assert_eq!(drv.name(), "nixcmd-hello.drv");
            let interesting: Vec<String> = events
                .iter()
                .filter_map(|e| match e {
                    BuildEvent::LogLine {
                        activity: a,
                        drv: d,
                        line,
                    } if *a == activity && d.as_ref() == Some(&drv) => Some(format!("log {line}")),
                    BuildEvent::Phase {
                        activity: a,
                        drv: d,
                        phase,
                    } if *a == activity && d.as_ref() == Some(&drv) => {
                        Some(format!("phase {phase}"))
                    }
                    BuildEvent::BuildStopped {
                        activity: a,
                        drv: d,
                    } if *a == activity => Some(format!("stop {}", d.name())),
                    _ => None,
                })
                .collect();
            assert_eq!(
                interesting,
                [
                    "phase unpackPhase",
                    "log hello: stdout line",
                    "log hello: stderr line",
                    "phase installPhase",
                    "stop nixcmd-hello.drv",
                ]
            );
            assert!(events.contains(&BuildEvent::Message {
                level: Level::Info,
                text: "this derivation will be built:".into(),
            }));
            assert!(events.iter().any(|e| matches!(
                e,
                BuildEvent::Progress {
                    done: 1,
                    expected: 1,
                    running: 0,
                    failed: 0,
                    ..
                }
            )));
            assert!(
                events.contains(&BuildEvent::Message {
                    level: Level::Warn,
                    text:
                        "warning: you did not specify '--add-root'; the result might be removed by \
                       the garbage collector"
                            .into(),
                })
            );
            assert!(errors(&events).is_empty());
        }
    }

    #[test]
    fn failed_build_reports_its_log_and_errors_without_colours() {
        for log in [FAIL_28, FAIL_226] {
            let events = parse_all(log);
            let lines: Vec<&str> = events
                .iter()
                .filter_map(|e| match e {
                    BuildEvent::LogLine { line, drv, .. } => {
                        assert_eq!(drv.as_ref().map(StorePath::name), Some("nixcmd-fail.drv"));
                        Some(line.as_str())
                    }
                    _ => None,
                })
                .collect();
            assert_eq!(lines, ["fail: some stdout", "fail: about to fail"]);
            let errors = errors(&events);
            assert_eq!(errors.len(), 2, "{errors:?}");
            assert!(errors[0].starts_with("error: builder for '/nix/store/"));
            assert!(errors[0].ends_with("-nixcmd-fail.drv' failed with exit code 3"));
            assert!(errors[1].starts_with("error: 1 dependencies of derivation '/nix/store/"));
            assert!(!errors.iter().any(|e| e.contains('\u{1b}')));
        }
    }

    #[test]
    fn check_reports_nondeterminism() {
        for log in [NONDET_28, NONDET_226] {
            let events = parse_all(log);
            assert!(events.iter().any(|e| matches!(
                e,
                BuildEvent::BuildStarted { drv, text, .. }
                    if text == &format!("checking outputs of '{drv}'")
            )));
            let errors = errors(&events);
            assert_eq!(errors.len(), 1);
            assert!(errors[0].contains("may not be deterministic: output '/nix/store/"));
        }
    }

    #[test]
    fn unknown_and_broken_lines_are_kept() {
        let mut parser = LogParser::new();
        assert_eq!(
            parser.parse("some plain output\n"),
            BuildEvent::Plain("some plain output".into())
        );
        assert_eq!(
            parser.parse("@nix {not json"),
            BuildEvent::Plain("@nix {not json".into())
        );
        assert_eq!(
            parser.parse("@nix [1]"),
            BuildEvent::Plain("@nix [1]".into())
        );
        assert_eq!(
            parser.parse(r#"@nix {"action":"frobnicate","id":1}"#),
            BuildEvent::Other(r#"{"action":"frobnicate","id":1}"#.into())
        );
        assert_eq!(
            parser.parse(r#"@nix {"action":"result","id":1,"type":101,"fields":[5]}"#),
            BuildEvent::Other(r#"{"action":"result","id":1,"type":101,"fields":[5]}"#.into())
        );
        // A build start whose first field is not a store path is reported as another activity.
        assert_eq!(
            parser
                .parse(r#"@nix {"action":"start","id":9,"type":105,"text":"x","fields":["bad"]}"#),
            BuildEvent::ActivityStarted {
                activity: 9,
                kind: activity::BUILD,
                text: "x".into()
            }
        );
        // Log lines of unknown activities have no derivation.
        assert_eq!(
            parser.parse(r#"@nix {"action":"result","id":3,"type":101,"fields":["x"]}"#),
            BuildEvent::LogLine {
                activity: 3,
                drv: None,
                line: "x".into()
            }
        );
    }

    #[test]
    fn remote_builds_name_their_machine() {
        let mut parser = LogParser::new();
        let drv = "/nix/store/09r6llz23jby8iybg98v4dbzgl6s0lg5-nixcmd-hello.drv";
        let line = format!(
            r#"@nix {{"action":"start","fields":["{drv}","ssh-ng://builder",1,1],"id":5,"level":3,"parent":0,"text":"building '{drv}' on 'ssh-ng://builder'","type":105}}"#
        );
        match parser.parse(&line) {
            BuildEvent::BuildStarted { machine, .. } => {
                assert_eq!(machine.as_deref(), Some("ssh-ng://builder"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn strips_colour_codes() {
        assert_eq!(
            strip_controls("\u{1b}[31;1merror:\u{1b}[0m builder for '\u{1b}[35;1mx\u{1b}[0m'"),
            "error: builder for 'x'"
        );
        assert_eq!(
            strip_controls("a\u{1b}]8;;http://x\u{7}b\u{1b}]8;;\u{1b}\\c"),
            "abc"
        );
        assert_eq!(strip_controls("trailing \u{1b}"), "trailing ");
        assert_eq!(strip_controls("plain ü"), "plain ü");
    }

    #[test]
    fn strips_every_control_a_terminal_would_act_on() {
        assert_eq!(strip_controls("ok\rFAKE"), "okFAKE");
        assert_eq!(strip_controls("secret\u{8}\u{8}\u{8}"), "secret");
        assert_eq!(strip_controls("a\u{9b}2Jb"), "ab");
        assert_eq!(strip_controls("a\u{9d}0;title\u{9c}b"), "ab");
        assert_eq!(strip_controls("a\u{85}\u{7f}\u{0}b"), "ab");
        assert_eq!(strip_controls("two\nlines\tkept"), "two\nlines\tkept");
    }

    #[test]
    fn levels_follow_nix_numbers() {
        assert_eq!(Level::from_number(0), Level::Error);
        assert_eq!(Level::from_number(3), Level::Info);
        assert_eq!(Level::from_number(99), Level::Vomit);
        assert!(Level::Error < Level::Warn);
    }
}
