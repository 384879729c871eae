//! The Lua scripts, each in its own `.lua` file under `lua/`, with `common.lua` (time, IDs,
//! expiry trimming, epochs) prepended. `Script` sends EVALSHA and loads the script on
//! NOSCRIPT, so a restarted Redis (or a new cluster node) needs nothing from us.

use std::sync::LazyLock;

use redis::Script;

macro_rules! script {
    ($name:ident, $file:literal) => {
        pub static $name: LazyLock<Script> = LazyLock::new(|| {
            Script::new(concat!(include_str!("lua/common.lua"), include_str!($file)))
        });
    };
}

script!(PUBLISH, "lua/publish.lua");
script!(READ, "lua/read.lua");
script!(STATS, "lua/stats.lua");
script!(PRESENCE_JOIN, "lua/presence_join.lua");
script!(PRESENCE_LEAVE, "lua/presence_leave.lua");
script!(PRESENCE_REFRESH, "lua/presence_refresh.lua");
script!(PRESENCE_LIST, "lua/presence_list.lua");
script!(ROSTER_HOLD, "lua/roster_hold.lua");
script!(ROSTER_RELEASE, "lua/roster_release.lua");
script!(ROSTER_MEMBERS, "lua/roster_members.lua");
script!(ROSTER_ALIVE, "lua/roster_alive.lua");
script!(ROSTER_REAP, "lua/roster_reap.lua");
script!(ROSTER_RESTORE, "lua/roster_restore.lua");
