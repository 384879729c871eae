-- Makes Redis hold for one node exactly what the node says it holds (after Redis lost its
-- data, after the node was reaped while alive, after a release whose answer was lost), fixing
-- the cluster-wide totals by the difference. Returns the members whose last hold went,
-- flat {set, member, value, ...}.
-- KEYS[1] the node's hash. ARGV[1] key base, then triples: field ("set\nmember"), holds, value.
local base = ARGV[1]
local old = {}
local raw = redis.call('HGETALL', KEYS[1])
for i = 1, #raw, 2 do
  old[raw[i]] = tonumber(raw[i + 1])
end
local want, values = {}, {}
for i = 2, #ARGV, 3 do
  want[ARGV[i]] = tonumber(ARGV[i + 1])
  values[ARGV[i]] = ARGV[i + 2]
end
local out = {}
local function fix(field, delta)
  if delta == 0 then
    return
  end
  local cut = string.find(field, '\n', 1, true)
  if not cut then
    return
  end
  local set, member = string.sub(field, 1, cut - 1), string.sub(field, cut + 1)
  local hkey, vkey = base .. 'h:' .. set, base .. 'v:' .. set
  local total = redis.call('HINCRBY', hkey, member, delta)
  if total <= 0 then
    local value = redis.call('HGET', vkey, member) or ''
    redis.call('HDEL', hkey, member)
    redis.call('HDEL', vkey, member)
    if total - delta > 0 then
      table.insert(out, set)
      table.insert(out, member)
      table.insert(out, value)
    end
  elseif total == delta then
    redis.call('HSET', vkey, member, values[field] or '')
  end
end
for field, n in pairs(want) do
  fix(field, n - (old[field] or 0))
end
for field, n in pairs(old) do
  if want[field] == nil then
    fix(field, -n)
  end
end
redis.call('DEL', KEYS[1])
for field, n in pairs(want) do
  redis.call('HSET', KEYS[1], field, n)
end
return out
