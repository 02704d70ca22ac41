//! What the broker knows about a connection, and the AWS IoT policy variables (and condition
//! keys) that are resolved from it.

use std::collections::BTreeMap;

/// Everything about one MQTT connection that AWS IoT policy variables and condition keys
/// can refer to. Built once when the device connects, then used for every decision on that
/// connection. Serialisable, so the server that decides a CONNECT can hand it to the
/// broker plugin that decides every message (fields missing from JSON take defaults).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ConnectionContext {
    /// The MQTT client ID (`iot:ClientId`).
    pub client_id: String,
    /// The thing the connection is for, when it is attached to the certificate the device
    /// presented (`iot:Connection.Thing.*`). `None` makes every thing variable unresolved
    /// and `iot:Connection.Thing.IsAttached` `"false"`. AWS takes the thing name from the
    /// client ID; set this only when the client ID names a thing attached to the
    /// certificate (fleetcert's policies require client ID = thing name).
    pub thing: Option<ThingContext>,
    /// The device certificate (`iot:Certificate.*`); `None` leaves those unresolved.
    pub certificate: Option<CertificateContext>,
}

/// The thing of a connection.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ThingContext {
    /// `iot:Connection.Thing.ThingName`.
    pub name: String,
    /// `iot:Connection.Thing.ThingTypeName`, when the thing has a type.
    pub thing_type_name: Option<String>,
    /// `iot:Connection.Thing.Attributes[name]`.
    pub attributes: BTreeMap<String, String>,
}

/// The attributes of a certificate that AWS IoT exposes as `iot:Certificate.*` variables.
/// Multi-valued attributes keep the certificate's order; AWS uses the first five values.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct CertificateContext {
    /// `iot:Certificate.Subject.*`.
    pub subject: DistinguishedName,
    /// `iot:Certificate.Issuer.*`.
    pub issuer: DistinguishedName,
    /// `iot:Certificate.Subject.AlternativeName.*`.
    pub subject_alternative_name: AlternativeNames,
    /// `iot:Certificate.Issuer.AlternativeName.*`.
    pub issuer_alternative_name: AlternativeNames,
    /// `iot:Certificate.SerialNumber`: the certificate serial as the caller renders it.
    pub serial_number: Option<String>,
    /// `iot:Certificate.Validity.NotBefore`, as the caller renders it.
    pub not_before: Option<String>,
    /// `iot:Certificate.Validity.NotAfter`, as the caller renders it.
    pub not_after: Option<String>,
}

/// The attributes of a subject or issuer name, each with every value it has.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct DistinguishedName {
    /// `Country` (C).
    pub country: Vec<String>,
    /// `Organization` (O).
    pub organization: Vec<String>,
    /// `OrganizationalUnit` (OU).
    pub organizational_unit: Vec<String>,
    /// `DistinguishedNameQualifier` (dnQualifier).
    pub distinguished_name_qualifier: Vec<String>,
    /// `State` (ST).
    pub state: Vec<String>,
    /// `CommonName` (CN).
    pub common_name: Vec<String>,
    /// `SerialNumber` (the serialNumber attribute, not the certificate serial).
    pub serial_number: Vec<String>,
    /// `Title`.
    pub title: Vec<String>,
    /// `Surname` (SN).
    pub surname: Vec<String>,
    /// `GivenName` (GN).
    pub given_name: Vec<String>,
    /// `Initials`.
    pub initials: Vec<String>,
    /// `Pseudonym`.
    pub pseudonym: Vec<String>,
    /// `GenerationQualifier`.
    pub generation_qualifier: Vec<String>,
}

/// The entries of a subject or issuer alternative name extension, by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct AlternativeNames {
    /// `RFC822Name` (e-mail addresses).
    pub rfc822_name: Vec<String>,
    /// `DNSName`.
    pub dns_name: Vec<String>,
    /// `DirectoryName`.
    pub directory_name: Vec<String>,
    /// `UniformResourceIdentifier`.
    pub uniform_resource_identifier: Vec<String>,
    /// `IPAddress`.
    pub ip_address: Vec<String>,
}

/// AWS uses at most this many values of a multi-valued certificate attribute.
const MAX_CERTIFICATE_VALUES: usize = 5;
/// A certificate value longer than this is not substituted (AWS's limit).
const MAX_CERTIFICATE_VALUE_CHARS: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DnAttribute {
    Country,
    Organization,
    OrganizationalUnit,
    DistinguishedNameQualifier,
    State,
    CommonName,
    SerialNumber,
    Title,
    Surname,
    GivenName,
    Initials,
    Pseudonym,
    GenerationQualifier,
}

impl DnAttribute {
    const ALL: [(&'static str, DnAttribute); 13] = [
        ("Country", DnAttribute::Country),
        ("Organization", DnAttribute::Organization),
        ("OrganizationalUnit", DnAttribute::OrganizationalUnit),
        (
            "DistinguishedNameQualifier",
            DnAttribute::DistinguishedNameQualifier,
        ),
        ("State", DnAttribute::State),
        ("CommonName", DnAttribute::CommonName),
        ("SerialNumber", DnAttribute::SerialNumber),
        ("Title", DnAttribute::Title),
        ("Surname", DnAttribute::Surname),
        ("GivenName", DnAttribute::GivenName),
        ("Initials", DnAttribute::Initials),
        ("Pseudonym", DnAttribute::Pseudonym),
        ("GenerationQualifier", DnAttribute::GenerationQualifier),
    ];

    fn of(self, dn: &DistinguishedName) -> &[String] {
        match self {
            DnAttribute::Country => &dn.country,
            DnAttribute::Organization => &dn.organization,
            DnAttribute::OrganizationalUnit => &dn.organizational_unit,
            DnAttribute::DistinguishedNameQualifier => &dn.distinguished_name_qualifier,
            DnAttribute::State => &dn.state,
            DnAttribute::CommonName => &dn.common_name,
            DnAttribute::SerialNumber => &dn.serial_number,
            DnAttribute::Title => &dn.title,
            DnAttribute::Surname => &dn.surname,
            DnAttribute::GivenName => &dn.given_name,
            DnAttribute::Initials => &dn.initials,
            DnAttribute::Pseudonym => &dn.pseudonym,
            DnAttribute::GenerationQualifier => &dn.generation_qualifier,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AltKind {
    Rfc822Name,
    DnsName,
    DirectoryName,
    UniformResourceIdentifier,
    IpAddress,
}

impl AltKind {
    const ALL: [(&'static str, AltKind); 5] = [
        ("RFC822Name", AltKind::Rfc822Name),
        ("DNSName", AltKind::DnsName),
        ("DirectoryName", AltKind::DirectoryName),
        (
            "UniformResourceIdentifier",
            AltKind::UniformResourceIdentifier,
        ),
        ("IPAddress", AltKind::IpAddress),
    ];

    fn of(self, names: &AlternativeNames) -> &[String] {
        match self {
            AltKind::Rfc822Name => &names.rfc822_name,
            AltKind::DnsName => &names.dns_name,
            AltKind::DirectoryName => &names.directory_name,
            AltKind::UniformResourceIdentifier => &names.uniform_resource_identifier,
            AltKind::IpAddress => &names.ip_address,
        }
    }
}

/// Which values of a multi-valued certificate attribute: the first (no suffix), the one at
/// a zero-based index (`.1` is the second value, as AWS documents), or all (`.List`, for
/// `ForAnyValue:`/`ForAllValues:` conditions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Select {
    First,
    Index(usize),
    List,
}

/// Where a certificate variable's values come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CertField {
    Name {
        issuer: bool,
        attribute: DnAttribute,
    },
    AltName {
        issuer: bool,
        kind: AltKind,
    },
    SerialNumber,
    NotBefore,
    NotAfter,
}

/// A policy variable / condition key, parsed once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Variable {
    /// `${*}`, `${?}`, `${$}`: the character itself.
    Char(char),
    ClientId,
    ThingName,
    ThingTypeName,
    ThingAttribute(String),
    IsAttached,
    Certificate(CertField, Select),
    /// Anything else: never resolves.
    Unknown(String),
}

/// The values a variable resolves to.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Values<'a> {
    One(&'a str),
    Many(&'a [String]),
}

impl<'a> Values<'a> {
    pub(crate) fn iter(self) -> impl Iterator<Item = &'a str> {
        let (one, many): (Option<&'a str>, &'a [String]) = match self {
            Values::One(s) => (Some(s), &[]),
            Values::Many(list) => (None, list),
        };
        one.into_iter().chain(many.iter().map(String::as_str))
    }
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

impl Variable {
    /// Parses the text inside `${…}`, or a condition key. Names are matched without regard
    /// to ASCII case (IAM condition keys are case-insensitive); an attribute name inside
    /// `Attributes[…]` is kept as written.
    pub(crate) fn parse(name: &str) -> Variable {
        match name {
            "*" => return Variable::Char('*'),
            "?" => return Variable::Char('?'),
            "$" => return Variable::Char('$'),
            _ => {}
        }
        let unknown = || Variable::Unknown(name.to_owned());
        let Some(rest) = strip_prefix_ignore_case(name, "iot:") else {
            return unknown();
        };
        if rest.eq_ignore_ascii_case("ClientId") {
            return Variable::ClientId;
        }
        if let Some(thing) = strip_prefix_ignore_case(rest, "Connection.Thing.") {
            if thing.eq_ignore_ascii_case("ThingName") {
                return Variable::ThingName;
            }
            if thing.eq_ignore_ascii_case("ThingTypeName") {
                return Variable::ThingTypeName;
            }
            if thing.eq_ignore_ascii_case("IsAttached") {
                return Variable::IsAttached;
            }
            if let Some(attribute) =
                strip_prefix_ignore_case(thing, "Attributes[").and_then(|a| a.strip_suffix(']'))
                && !attribute.is_empty()
            {
                return Variable::ThingAttribute(attribute.to_owned());
            }
            return unknown();
        }
        let Some(cert) = strip_prefix_ignore_case(rest, "Certificate.") else {
            return unknown();
        };
        for (text, field) in [
            ("SerialNumber", CertField::SerialNumber),
            ("Validity.NotBefore", CertField::NotBefore),
            ("Validity.NotAfter", CertField::NotAfter),
        ] {
            if cert.eq_ignore_ascii_case(text) {
                return Variable::Certificate(field, Select::First);
            }
        }
        let (issuer, tail) = if let Some(tail) = strip_prefix_ignore_case(cert, "Subject.") {
            (false, tail)
        } else if let Some(tail) = strip_prefix_ignore_case(cert, "Issuer.") {
            (true, tail)
        } else {
            return unknown();
        };
        // `Attribute`, `Attribute.N` or `Attribute.List`.
        let (field_name, select) = match tail.rsplit_once('.') {
            Some((head, list)) if list.eq_ignore_ascii_case("List") => (head, Select::List),
            Some((head, index))
                if !index.is_empty() && index.bytes().all(|b| b.is_ascii_digit()) =>
            {
                match index.parse::<usize>() {
                    Ok(n) => (head, Select::Index(n)),
                    Err(_) => return unknown(),
                }
            }
            _ => (tail, Select::First),
        };
        let field = if let Some(kind) = strip_prefix_ignore_case(field_name, "AlternativeName.") {
            match AltKind::ALL
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(kind))
            {
                Some((_, kind)) => CertField::AltName {
                    issuer,
                    kind: *kind,
                },
                None => return unknown(),
            }
        } else {
            match DnAttribute::ALL
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(field_name))
            {
                Some((_, attribute)) => CertField::Name {
                    issuer,
                    attribute: *attribute,
                },
                None => return unknown(),
            }
        };
        Variable::Certificate(field, select)
    }

    /// The variable's values in `ctx`, as a condition key sees them (`None`: the key is not
    /// in the request context).
    pub(crate) fn values<'a>(&self, ctx: &'a ConnectionContext) -> Option<Values<'a>> {
        match self {
            Variable::Char(c) => Some(Values::One(match c {
                '*' => "*",
                '?' => "?",
                _ => "$",
            })),
            Variable::ClientId => Some(Values::One(&ctx.client_id)),
            Variable::ThingName => ctx.thing.as_ref().map(|t| Values::One(t.name.as_str())),
            Variable::ThingTypeName => ctx
                .thing
                .as_ref()
                .and_then(|t| t.thing_type_name.as_deref())
                .map(Values::One),
            Variable::ThingAttribute(name) => ctx
                .thing
                .as_ref()
                .and_then(|t| t.attributes.get(name))
                .map(|v| Values::One(v.as_str())),
            Variable::IsAttached => Some(Values::One(if ctx.thing.is_some() {
                "true"
            } else {
                "false"
            })),
            Variable::Certificate(field, select) => {
                let cert = ctx.certificate.as_ref()?;
                let all: &[String] = match field {
                    CertField::Name { issuer, attribute } => {
                        attribute.of(if *issuer { &cert.issuer } else { &cert.subject })
                    }
                    CertField::AltName { issuer, kind } => kind.of(if *issuer {
                        &cert.issuer_alternative_name
                    } else {
                        &cert.subject_alternative_name
                    }),
                    CertField::SerialNumber => {
                        return cert.serial_number.as_deref().map(Values::One);
                    }
                    CertField::NotBefore => return cert.not_before.as_deref().map(Values::One),
                    CertField::NotAfter => return cert.not_after.as_deref().map(Values::One),
                };
                let all = &all[..all.len().min(MAX_CERTIFICATE_VALUES)];
                match select {
                    Select::First => all.first().map(|v| Values::One(v.as_str())),
                    Select::Index(n) => all.get(*n).map(|v| Values::One(v.as_str())),
                    Select::List if all.is_empty() => None,
                    Select::List => Some(Values::Many(all)),
                }
            }
            Variable::Unknown(_) => None,
        }
    }

    /// The one value substituted for `${variable}` in a resource or condition value, or
    /// `None` when it cannot be resolved. A list (`.List`) is never substituted, and, as AWS
    /// documents, neither is a certificate value that holds a wildcard character
    /// (`*`, `$`, `+`, `?`, `#`) or is longer than 1024 characters.
    pub(crate) fn substitute<'a>(&self, ctx: &'a ConnectionContext) -> Option<&'a str> {
        match self.values(ctx)? {
            Values::One(v) => {
                if matches!(self, Variable::Certificate(..))
                    && (v.contains(['*', '$', '+', '?', '#'])
                        || v.chars().count() > MAX_CERTIFICATE_VALUE_CHARS)
                {
                    None
                } else {
                    Some(v)
                }
            }
            Values::Many(_) => None,
        }
    }

    /// Whether AWS IoT knows this condition key (an unknown key is not evaluated: see
    /// [`super::Policy`]).
    pub(crate) fn is_known_key(&self) -> bool {
        !matches!(self, Variable::Unknown(_) | Variable::Char(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_variables() {
        assert_eq!(Variable::parse("iot:ClientId"), Variable::ClientId);
        assert_eq!(Variable::parse("IoT:clientid"), Variable::ClientId);
        assert_eq!(
            Variable::parse("iot:Connection.Thing.Attributes[Floor]"),
            Variable::ThingAttribute("Floor".into())
        );
        assert_eq!(
            Variable::parse("iot:Certificate.Subject.Country.1"),
            Variable::Certificate(
                CertField::Name {
                    issuer: false,
                    attribute: DnAttribute::Country
                },
                Select::Index(1)
            )
        );
        assert_eq!(
            Variable::parse("iot:Certificate.Issuer.AlternativeName.DNSName.List"),
            Variable::Certificate(
                CertField::AltName {
                    issuer: true,
                    kind: AltKind::DnsName
                },
                Select::List
            )
        );
        assert_eq!(
            Variable::parse("iot:Certificate.Validity.NotAfter"),
            Variable::Certificate(CertField::NotAfter, Select::First)
        );
        for unknown in [
            "iot:Thing.ThingName",
            "iot:Connection.Thing.Attributes[]",
            "iot:Certificate.Subject.Nickname",
            "iot:Certificate.Subject.Country.99999999999999999999999",
            "aws:SourceIp",
            "",
        ] {
            assert!(
                matches!(Variable::parse(unknown), Variable::Unknown(_)),
                "{unknown}"
            );
        }
    }
}
