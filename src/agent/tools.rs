//! The builtin tools: real, offline and deterministic. Each takes JSON arguments and
//! returns a JSON result or an error the agent reports; none can panic on input. The
//! builtin agent calls them itself; a model is offered them with their JSON schemas.

use serde_json::{Value, json};

/// A tool the builtin agent can call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    /// Reads the message itself: words, characters, whether it asks something.
    AnalyzeMessage,
    /// Evaluates an arithmetic expression.
    Calculator,
    /// The current UTC time.
    Clock,
}

impl Tool {
    /// Every tool, in the order a model is offered them.
    pub const ALL: [Tool; 3] = [Self::Calculator, Self::Clock, Self::AnalyzeMessage];

    /// The tool a model names, if it exists.
    pub fn by_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::AnalyzeMessage => "analyze_message",
            Self::Calculator => "calculator",
            Self::Clock => "clock",
        }
    }

    /// What the tool does, for a model deciding whether to call it.
    pub fn description(self) -> &'static str {
        match self {
            Self::AnalyzeMessage => "Counts the words and characters of a text and says whether it asks a question.",
            Self::Calculator => {
                "Evaluates an arithmetic expression with + - * / % ^ and parentheses, e.g. 12 * (3 + 4)."
            }
            Self::Clock => "Returns the current date and time in UTC (RFC 3339).",
        }
    }

    /// The JSON schema of the tool's arguments.
    pub fn schema(self) -> Value {
        match self {
            Self::AnalyzeMessage => json!({
                "type": "object",
                "properties": {"text": {"type": "string", "description": "the text to analyze"}},
                "required": ["text"],
            }),
            Self::Calculator => json!({
                "type": "object",
                "properties": {"expression": {"type": "string", "description": "the expression, e.g. 6*7"}},
                "required": ["expression"],
            }),
            Self::Clock => json!({"type": "object", "properties": {}}),
        }
    }

    /// Runs the tool on `args`; bad arguments are an error, never a panic.
    pub fn run(self, args: &Value) -> Result<Value, String> {
        match self {
            Self::AnalyzeMessage => {
                let text = args["text"].as_str().ok_or("argument 'text' must be a string")?;
                Ok(json!({
                    "words": text.split_whitespace().count(),
                    "characters": text.chars().count(),
                    "is_question": text.trim_end().ends_with('?'),
                }))
            }
            Self::Calculator => {
                let expr = args["expression"].as_str().ok_or("argument 'expression' must be a string")?;
                let value = evaluate(expr)?;
                Ok(json!({"expression": expr, "value": format_number(value)}))
            }
            Self::Clock => {
                let now = crate::protocol::now_rfc3339();
                Ok(json!({"utc": now}))
            }
        }
    }
}

/// Finds an arithmetic expression in free text ("what is 12 * (3 + 4)?" → "12 * (3 + 4)").
pub fn find_expression(text: &str) -> Option<String> {
    let allowed = |c: char| c.is_ascii_digit() || " .+-*/%^()×÷".contains(c);
    let mut candidates = Vec::new();
    let mut current = String::new();
    for c in text.chars().chain(std::iter::once('\n')) {
        if allowed(c) {
            current.push(match c {
                '×' => '*',
                '÷' => '/',
                other => other,
            });
        } else if !current.is_empty() {
            candidates.push(std::mem::take(&mut current));
        }
    }
    candidates.into_iter().find_map(|c| {
        let c = c.trim().trim_start_matches(')').trim_end_matches('(').trim().to_string();
        let has_operator = c.chars().skip(1).any(|ch| "+-*/%^".contains(ch));
        (has_operator && c.chars().any(|ch| ch.is_ascii_digit()) && evaluate(&c).is_ok()).then_some(c)
    })
}

/// Formats without a trailing `.0` for whole numbers.
pub fn format_number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 { format!("{}", v as i64) } else { format!("{v}") }
}

/// Evaluates `+ - * / % ^` and parentheses over decimals, with the usual precedence.
pub fn evaluate(expr: &str) -> Result<f64, String> {
    let tokens = tokenize(expr)?;
    let mut p = Parser { tokens: &tokens, pos: 0, depth: 0 };
    let v = p.expr()?;
    if p.pos != tokens.len() {
        return Err("unexpected input after the expression".into());
    }
    if !v.is_finite() {
        return Err("the result is not a finite number (division by zero?)".into());
    }
    Ok(v)
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Token {
    Num(f64),
    Op(char),
}

fn tokenize(expr: &str) -> Result<Vec<Token>, String> {
    let mut tokens = Vec::new();
    let chars: Vec<char> = expr.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c.is_ascii_digit() || c == '.' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.') {
                i += 1;
            }
            let s: String = chars[start..i].iter().collect();
            tokens.push(Token::Num(s.parse().map_err(|_| format!("'{s}' is not a number"))?));
        } else if "+-*/%^()".contains(c) {
            tokens.push(Token::Op(c));
            i += 1;
        } else {
            return Err(format!("unexpected character '{c}'"));
        }
    }
    if tokens.is_empty() {
        return Err("empty expression".into());
    }
    Ok(tokens)
}

/// Deeper nesting is refused rather than risking the stack on hostile input.
const MAX_DEPTH: usize = 64;

struct Parser<'a> {
    tokens: &'a [Token],
    pos: usize,
    depth: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<Token> {
        self.tokens.get(self.pos).copied()
    }

    fn expr(&mut self) -> Result<f64, String> {
        let mut v = self.term()?;
        while let Some(Token::Op(op @ ('+' | '-'))) = self.peek() {
            self.pos += 1;
            let rhs = self.term()?;
            v = if op == '+' { v + rhs } else { v - rhs };
        }
        Ok(v)
    }

    fn term(&mut self) -> Result<f64, String> {
        let mut v = self.power()?;
        while let Some(Token::Op(op @ ('*' | '/' | '%'))) = self.peek() {
            self.pos += 1;
            let rhs = self.power()?;
            v = match op {
                '*' => v * rhs,
                '/' => v / rhs,
                _ => v % rhs,
            };
        }
        Ok(v)
    }

    fn power(&mut self) -> Result<f64, String> {
        let base = self.unary()?;
        if let Some(Token::Op('^')) = self.peek() {
            self.pos += 1;
            self.enter()?;
            let exp = self.power()?;
            self.depth -= 1;
            return Ok(base.powf(exp));
        }
        Ok(base)
    }

    fn unary(&mut self) -> Result<f64, String> {
        match self.peek() {
            Some(Token::Op('-')) => {
                self.pos += 1;
                self.enter()?;
                let v = self.unary()?;
                self.depth -= 1;
                Ok(-v)
            }
            Some(Token::Op('+')) => {
                self.pos += 1;
                self.unary()
            }
            Some(Token::Num(n)) => {
                self.pos += 1;
                Ok(n)
            }
            Some(Token::Op('(')) => {
                self.pos += 1;
                self.enter()?;
                let v = self.expr()?;
                self.depth -= 1;
                match self.peek() {
                    Some(Token::Op(')')) => {
                        self.pos += 1;
                        Ok(v)
                    }
                    _ => Err("missing ')'".into()),
                }
            }
            Some(Token::Op(c)) => Err(format!("unexpected '{c}'")),
            None => Err("the expression ends too early".into()),
        }
    }

    fn enter(&mut self) -> Result<(), String> {
        self.depth += 1;
        if self.depth > MAX_DEPTH { Err("expression nested too deeply".into()) } else { Ok(()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_follows_precedence() {
        assert_eq!(evaluate("12 * (3 + 4)"), Ok(84.0));
        assert_eq!(evaluate("2 + 3 * 4 - 6 / 3"), Ok(12.0));
        assert_eq!(evaluate("2 ^ 3 ^ 2"), Ok(512.0));
        assert_eq!(evaluate("-(1.5 + 0.5) * 3"), Ok(-6.0));
        assert!(evaluate("1 / 0").is_err());
        assert!(evaluate("(1 + 2").is_err());
        assert!(evaluate(&"(".repeat(10_000)).is_err());
    }

    #[test]
    fn every_tool_has_an_object_schema_and_is_found_by_name() {
        for tool in Tool::ALL {
            assert_eq!(Tool::by_name(tool.name()), Some(tool));
            assert_eq!(tool.schema()["type"], "object");
            assert!(!tool.description().is_empty());
        }
        assert_eq!(Tool::by_name("rm -rf"), None);
        assert!(Tool::Calculator.run(&json!({"expression": 7})).is_err());
    }

    #[test]
    fn expressions_are_found_in_sentences() {
        assert_eq!(find_expression("what is 12 * (3 + 4)?").as_deref(), Some("12 * (3 + 4)"));
        assert_eq!(find_expression("compute 7×6 please").as_deref(), Some("7*6"));
        assert_eq!(find_expression("hello there, 2025 was a year"), None);
    }
}
