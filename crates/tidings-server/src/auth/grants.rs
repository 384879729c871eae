//! Channel grants from a token: exact names or `*` globs, where `*` matches any run of
//! characters, `:` included (SPEC §10: `chat:*` covers `chat:a:b`; `*` covers everything).

/// Whether `pattern` covers `channel`. Iterative with one backtrack point per `*`, so a
/// hostile pattern costs O(len × len) at worst, never exponential.
pub fn matches(pattern: &str, channel: &str) -> bool {
    let (p, c) = (pattern.as_bytes(), channel.as_bytes());
    let (mut pi, mut ci) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ci < c.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ci));
            pi += 1;
        } else if pi < p.len() && p[pi] == c[ci] {
            pi += 1;
            ci += 1;
        } else if let Some((sp, sc)) = star {
            pi = sp + 1;
            ci = sc + 1;
            star = Some((sp, sc + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

/// Whether any of `grants` covers `channel`.
pub fn any_matches(grants: &[String], channel: &str) -> bool {
    grants.iter().any(|g| matches(g, channel))
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn a_star_covers_any_run_including_colons() {
        assert!(matches("chat:*", "chat:a"));
        assert!(matches("chat:*", "chat:a:b"));
        assert!(matches("chat:*", "chat:"));
        assert!(!matches("chat:*", "chats:a"));
        assert!(matches("*", "anything:at:all"));
        assert!(matches("a*c", "abbbc"));
        assert!(!matches("a*c", "abbbd"));
        assert!(matches("*:lobby", "chat:lobby"));
    }

    #[test]
    fn exact_names_match_only_themselves() {
        assert!(matches("chat:lobby", "chat:lobby"));
        assert!(!matches("chat:lobby", "chat:lobby2"));
        assert!(!matches("chat:lobby", "chat:lobb"));
    }

    #[test]
    fn many_stars_stay_cheap() {
        let pattern = "*a".repeat(60);
        let channel = "a".repeat(128);
        // Would take ages with naive recursion.
        assert!(matches(&pattern, &channel));
        assert!(!matches(&format!("{pattern}b"), &channel));
    }
}
