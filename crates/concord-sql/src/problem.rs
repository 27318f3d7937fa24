//! A problem found in the configuration or in the live database schema, naming where it is.

use std::fmt;

/// How bad a [`Problem`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// The adapter cannot work this way: `check` fails and `run` refuses to start.
    Error,
    /// It works, but probably not as meant (e.g. a create from another system will fail).
    Warning,
}

/// One problem: where (entity, table, column, canonical field) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub severity: Severity,
    pub entity: Option<String>,
    pub table: Option<String>,
    pub column: Option<String>,
    pub field: Option<String>,
    pub why: String,
}

impl Problem {
    /// An error about nothing more precise than the configuration.
    pub fn error(why: impl Into<String>) -> Problem {
        Problem {
            severity: Severity::Error,
            entity: None,
            table: None,
            column: None,
            field: None,
            why: why.into(),
        }
    }

    /// A warning.
    pub fn warning(why: impl Into<String>) -> Problem {
        Problem {
            severity: Severity::Warning,
            ..Problem::error(why)
        }
    }

    pub fn entity(mut self, entity: &str) -> Problem {
        self.entity = Some(entity.to_owned());
        self
    }

    pub fn table(mut self, table: &str) -> Problem {
        self.table = Some(table.to_owned());
        self
    }

    pub fn column(mut self, column: &str) -> Problem {
        self.column = Some(column.to_owned());
        self
    }

    pub fn field(mut self, field: &str) -> Problem {
        self.field = Some(field.to_owned());
        self
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        })?;
        let mut sep = ": ";
        for (what, value) in [
            ("entity", &self.entity),
            ("table", &self.table),
            ("column", &self.column),
            ("field", &self.field),
        ] {
            if let Some(v) = value {
                write!(f, "{sep}{what} `{v}`")?;
                sep = ", ";
            }
        }
        write!(f, ": {}", self.why)
    }
}

/// Problems as one error message, one per line.
pub fn lines(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_problem_names_where_it_is() {
        let p = Problem::error("no such column")
            .entity("customer")
            .table("customers")
            .column("mail")
            .field("email");
        assert_eq!(
            p.to_string(),
            "error: entity `customer`, table `customers`, column `mail`, field `email`: no such column"
        );
        assert_eq!(
            Problem::warning("w").to_string(),
            "warning: w",
            "nothing to name"
        );
    }
}
